"""Signal models and seeding of the simulator (no sockets)."""

from __future__ import annotations

import itertools
import statistics

from simulators._signals import (
    FIRMWARE,
    TABLE_SIZE,
    Noise,
    Rng,
    Signals,
    fixed,
    noise_tables,
)

DAY_MS = 86_400_000
T0 = 1_732_000_000_000  # 2024-11-19, epoch ms


def run(signals: Signals, n: int, step_ms: int = 1000) -> list[tuple[float, float, float, int]]:
    return [signals.step(T0 + i * step_ms) for i in range(n)]


def test_same_seed_and_device_give_the_same_values() -> None:
    assert run(Signals(7, 3), 2000) == run(Signals(7, 3), 2000)
    assert Signals(7, 3).fw == Signals(7, 3).fw


def test_other_seed_or_other_device_gives_other_values() -> None:
    base = run(Signals(7, 3), 200)
    assert run(Signals(8, 3), 200) != base
    assert run(Signals(7, 4), 200) != base


def test_a_device_does_not_depend_on_the_rest_of_the_fleet() -> None:
    alone = run(Signals(11, 42), 500)
    fleet = [Signals(11, i) for i in range(100)]
    for s in fleet[:42]:
        run(s, 37)  # other devices advancing must not disturb device 42
    assert run(fleet[42], 500) == alone


def test_temperature_follows_a_daily_cycle() -> None:
    s = Signals(5, 9)
    ten_minutes = 600_000
    day = [s.step(T0 + i * ten_minutes)[0] for i in range(144)]
    warmest, coldest = day.index(max(day)), day.index(min(day))
    # Amplitude is at least 2 degC: the swing dwarfs the 0.15 degC noise.
    assert max(day) - min(day) > 3.5
    # Warmest and coldest about twelve hours apart (72 ten-minute steps), noise allowing.
    gap = abs(warmest - coldest)
    assert 60 <= min(gap, 144 - gap) <= 72
    # The same time of day a day later is about as warm.
    later = [s.step(T0 + DAY_MS + i * ten_minutes)[0] for i in range(144)]
    assert max(abs(a - b) for a, b in zip(day, later, strict=True)) < 1.5


def test_temperature_noise_is_small_and_centred() -> None:
    s = Signals(3, 1)
    residuals = [s.step(T0 + i * 1000)[0] - s.temperature_mean(T0 + i * 1000) for i in range(5000)]
    assert abs(statistics.fmean(residuals)) < 0.02
    assert 0.1 < statistics.pstdev(residuals) < 0.2


def test_humidity_is_a_bounded_random_walk() -> None:
    s = Signals(1, 2)
    hs = [v[1] for v in run(s, 100_000)]
    assert all(5.0 <= h <= 100.0 for h in hs)
    steps = [abs(b - a) for a, b in itertools.pairwise(hs)]
    assert statistics.fmean(steps) > 0.1  # it moves...
    assert max(steps) < 5.0  # ...by small steps


def test_humidity_stays_in_bounds_from_the_edges() -> None:
    s = Signals(1, 2)
    for start in (5.0, 100.0):
        s.humidity = start
        assert all(5.0 <= v[1] <= 100.0 for v in run(s, 2000))


def test_battery_drains_slowly_and_is_replaced_when_flat() -> None:
    s = Signals(2, 5)
    bs = [v[2] for v in run(s, 2000)]
    assert all(b2 <= b1 for b1, b2 in itertools.pairwise(bs))
    assert 0.5 < bs[0] - bs[-1] < 10.0
    s.battery = 0.0001
    assert s.step(T0)[2] == 100.0


def test_rssi_is_an_integer_jittering_within_radio_bounds() -> None:
    rs = [v[3] for v in run(Signals(4, 4), 5000)]
    assert all(isinstance(r, int) and -120 <= r <= -30 for r in rs)
    assert 2.0 < statistics.pstdev(rs) < 4.0


def test_values_are_rounded_and_fw_is_a_version_string() -> None:
    s = Signals(9, 9)
    for t, h, b, _r in run(s, 1000):
        assert round(t, 2) == t and round(h, 1) == h and round(b, 3) == b
    assert s.fw in FIRMWARE


def test_fixed_rounds_half_up() -> None:
    assert fixed(21.234, 100.0) == 21.23
    assert fixed(21.235001, 100.0) == 21.24
    assert fixed(-3.14159, 10.0) == -3.1
    assert repr(fixed(0.1 + 0.2, 100.0)) == "0.3"


def test_noise_tables_are_seeded_gaussian_and_uniform() -> None:
    gauss, uniform = noise_tables(123)
    assert len(gauss) == len(uniform) == TABLE_SIZE
    assert abs(statistics.fmean(gauss)) < 0.02
    assert 0.98 < statistics.pstdev(gauss) < 1.02
    assert min(uniform) >= 0.0 and max(uniform) < 1.0
    assert abs(statistics.fmean(uniform) - 0.5) < 0.01
    assert noise_tables(123)[0] == gauss
    assert noise_tables(124)[0] != gauss


def test_a_noise_walk_visits_every_entry_once_per_period() -> None:
    table = noise_tables(5)[0]
    walk = Noise(table, 5, 17, 1)
    draws = [walk.next() for _ in range(TABLE_SIZE)]
    assert sorted(draws) == sorted(table)
    assert walk.next() == draws[0]  # and then repeats


def test_rng_is_deterministic_and_in_range() -> None:
    a, b = Rng(1, 2, 3), Rng(1, 2, 3)
    xs = [a.uniform() for _ in range(1000)]
    assert xs == [b.uniform() for _ in range(1000)]
    assert all(0.0 <= x < 1.0 for x in xs)
    assert [Rng(1, 2, 4).uniform() for _ in range(3)] != xs[:3]
    assert all(0 <= Rng(9).below(7) < 7 for _ in range(100))
