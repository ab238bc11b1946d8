"""A non-editable install must carry the SQL migrations inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_and_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("iot_ingest-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    shipped = {n for n in names if n.startswith("ingest/db/migrations/")}
    expected = {f"ingest/db/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    assert expected and shipped == expected
    assert "simulators/__init__.py" in names
    assert "ingest = ingest.cli:main" in scripts
    assert "simulate = simulators.cli:main" in scripts
