"""The multi-host harness itself: hosts reach each other, a cut host is unreachable until restored, and nothing it
made outlives it (closed, or left behind by a run that died)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.multihost.netns import PREFIX, Network, remove_leftovers, run_ip, unavailable

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"network namespaces: {unavailable()}")

SERVER = "import socket, sys\ns = socket.create_server((sys.argv[1], 7000))\nprint('up', flush=True)\nwhile True: s.accept()[0].close()\n"


def reachable(address: str) -> bool:
    try:
        socket.create_connection((address, 7000), timeout=1).close()
        return True
    except OSError:
        return False


def namespaces() -> set[str]:
    return {line.split()[0] for line in run_ip("netns", "list").splitlines() if line.strip()}


def test_hosts_talk_a_cut_host_does_not_and_close_leaves_nothing():
    net = Network()
    try:
        host = net.add_host("h1")
        server = subprocess.Popen([*host.inside, sys.executable, "-c", SERVER, host.address], stdout=subprocess.PIPE)
        assert server.stdout.readline().strip() == b"up"
        assert reachable(host.address)
        host.cut()
        assert not reachable(host.address)
        host.restore()
        deadline = time.monotonic() + 10
        while not reachable(host.address):
            assert time.monotonic() < deadline, "the restored host stayed unreachable"
            time.sleep(0.1)
        assert {net.switch, host.netns} <= namespaces()
    finally:
        net.close()
    assert server.wait(10) == -9  # what ran inside was killed
    assert not {n for n in namespaces() if n.startswith(net.tag)}
    assert net.client_link not in run_ip("-o", "link", "show")


def test_what_a_dead_run_left_behind_is_removed():
    dead = 2**22 + 1  # above the kernel's largest pid (PID_MAX_LIMIT): no process has it
    stale = f"{PREFIX}{dead}sw"
    run_ip("netns", "add", stale)
    try:
        remove_leftovers()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
