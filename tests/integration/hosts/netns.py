"""Hosts made of Linux network namespaces, wired to switches, whose links the tests cut.

A :class:`Network` is one namespace holding a bridge per named net (the switches) and one
namespace per host, each host plugged into its nets by a veth pair: the host's end is called
after the net, the switch's end ``<host>-<net>``. Addresses exist only inside the namespaces
(``10.231.<net>.<host>/24``); the root namespace gets nothing but the namespaces' names.
Cutting a link sets the switch's end down: the host sees its cable pulled (no error, packets go
nowhere), as a real cable cut or a dead switch port looks from a host.

Work happens in a host in two ways: a process started through :meth:`Network.exec`
(``ip netns exec``), and a Python function run by :meth:`Network.call` in a thread of this
process that entered the namespace (``setns`` moves only the calling thread; sockets and child
processes it creates stay in that namespace). :meth:`Network.close` deletes every namespace,
also after a failure; processes still inside keep theirs alive until they end, so stop them
first. A run killed before it could clean up leaves its namespaces behind: the next
:meth:`Network.start` deletes those whose run's process is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, Self, TypeVar

__all__ = ["Host", "Network", "remove_stale", "unavailable"]

P = ParamSpec("P")
T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
# Every namespace this module makes is named ih<pid>x<random>-<name>: the pid tells the
# namespaces of a run that was killed before it could delete them (see remove_stale).
_PREFIX = "ih"
_NAME = re.compile(rf"^{_PREFIX}([0-9a-f]+)x[0-9a-f]+-\S+")


def _ip() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    ip = _ip()
    assert ip is not None
    return subprocess.run(
        [ip, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )


def _must(*args: str) -> None:
    r = _run(*args)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can: it makes one, with
    a veth pair and a bridge in it, and removes it."""
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); run the suite as root"
    if _ip() is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"{_PREFIX}{os.getpid():x}x{uuid.uuid4().hex[:4]}-probe"
    steps = (
        ("netns", "add", probe),
        ("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ("-n", probe, "link", "add", "b0", "type", "bridge"),
    )
    try:
        for step in steps:
            r = _run(*step)
            if r.returncode != 0:
                return (
                    f"cannot make network namespaces here (`ip {' '.join(step)}`: "
                    f"{r.stderr.strip()}); CAP_NET_ADMIN and CAP_SYS_ADMIN are needed"
                )
        return None
    finally:
        _run("netns", "del", probe)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone (killed before it could clean up);
    those of runs still going are left alone. Returns the names deleted."""
    listed = _run("netns", "list")
    stale = []
    for line in listed.stdout.splitlines():
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1), 16)) and _run("netns", "del", name).returncode == 0:
            stale.append(name)
    return stale


def _enter(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    """A host: its short name, its namespace, and its address on each net."""

    name: str
    netns: str
    addresses: Mapping[str, str]


class Network:
    """Switches for ``nets`` (net name -> its /24 prefix, e.g. ``{"front": "10.231.1"}``)
    and the hosts plugged into them."""

    def __init__(self, nets: Mapping[str, str]) -> None:
        self.token = f"{os.getpid():x}x{uuid.uuid4().hex[:4]}"
        self.nets = dict(nets)
        self.hosts: dict[str, Host] = {}
        self._switch = self._namespace("sw")
        self._made: list[str] = []
        self._threads: dict[str, ThreadPoolExecutor] = {}

    def _namespace(self, name: str) -> str:
        return f"{_PREFIX}{self.token}-{name}"

    def start(self) -> Self:
        remove_stale()
        self._add_namespace(self._switch)
        for net in self.nets:
            _must("-n", self._switch, "link", "add", f"br-{net}", "type", "bridge")
            _must("-n", self._switch, "link", "set", f"br-{net}", "up")
        return self

    def _add_namespace(self, netns: str) -> None:
        _must("netns", "add", netns)
        self._made.append(netns)
        _must("-n", netns, "link", "set", "lo", "up")

    def add_host(self, name: str, **octets: int) -> Host:
        """A host plugged into each net named in ``octets`` (net -> last address octet)."""
        netns = self._namespace(name)
        self._add_namespace(netns)
        addresses = {}
        for net, octet in octets.items():
            port = f"{name}-{net}"
            _must("-n", self._switch, "link", "add", port, "type", "veth",
                  "peer", "name", net, "netns", netns)  # fmt: skip
            _must("-n", self._switch, "link", "set", port, "master", f"br-{net}", "up")
            addresses[net] = f"{self.nets[net]}.{octet}"
            _must("-n", netns, "addr", "add", f"{addresses[net]}/24", "dev", net)
            _must("-n", netns, "link", "set", net, "up")
        host = Host(name=name, netns=netns, addresses=addresses)
        self.hosts[name] = host
        return host

    def _links(self, host: str, nets: tuple[str, ...]) -> list[str]:
        return [f"{host}-{net}" for net in nets or tuple(self.hosts[host].addresses)]

    def cut(self, host: str, *nets: str) -> None:
        """Pull ``host``'s cables to ``nets`` (all of them when none is named)."""
        for link in self._links(host, nets):
            _must("-n", self._switch, "link", "set", link, "down")

    def restore(self, host: str, *nets: str) -> None:
        for link in self._links(host, nets):
            _must("-n", self._switch, "link", "set", link, "up")

    @contextlib.contextmanager
    def cut_off(self, host: str, *nets: str) -> Iterator[None]:
        """``host`` cut from ``nets`` for the block, plugged back in even when it fails."""
        self.cut(host, *nets)
        try:
            yield
        finally:
            self.restore(host, *nets)

    def exec(self, host: str) -> list[str]:
        """The command prefix that runs a program in ``host``."""
        ip = _ip()
        assert ip is not None
        return [ip, "netns", "exec", self.hosts[host].netns]

    def call(self, host: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` run in ``host``'s namespace (by a thread kept for it)."""
        thread = self._threads.get(host)
        if thread is None:
            path = f"/run/netns/{self.hosts[host].netns}"
            thread = ThreadPoolExecutor(1, f"netns-{host}", initializer=_enter, initargs=(path,))
            self._threads[host] = thread
        return thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        for thread in self._threads.values():
            thread.shutdown(wait=False, cancel_futures=True)
        self._threads.clear()
        failed = []
        for netns in reversed(self._made):
            r = _run("netns", "del", netns)
            if r.returncode != 0:
                failed.append(f"{netns}: {r.stderr.strip()}")
        self._made.clear()
        if failed:
            raise RuntimeError("could not delete network namespaces: " + "; ".join(failed))

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
