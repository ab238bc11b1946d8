"""The hosts room's lab (lab.py), made once per module and taken apart at its end: servers
first, then every namespace, also when a test failed. Where it cannot be made (not root, no
``ip``, no CAP_NET_ADMIN, no mosquitto), the room is skipped with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.integration.hosts.lab import NETS, Lab, servers, why_not
from tests.integration.hosts.netns import Network


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if reason := why_not():
        pytest.skip(reason)
    with ExitStack() as stack:
        net = stack.enter_context(Network(NETS))
        net.add_host("broker", front=2)
        net.add_host("db", back=2)
        net.add_host("pub", front=20)
        net.add_host("ing1", front=11, back=11)
        net.add_host("ing2", front=12, back=12)
        # Entered after the network: the servers stop before the namespaces go.
        yield servers(stack, net)
