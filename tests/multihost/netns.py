"""Hosts made of Linux network namespaces, for tests of what crosses a real network.

A :class:`Network` is a private /24 on a bridge that lives in a namespace of its own (the "switch"). Each
:class:`Host` is a namespace with a loopback and one ``eth0``, joined to the bridge by a veth pair whose far end
sits in the switch; cutting a host off (:meth:`Host.cut`) sets that far end down, as pulling its cable would.
The namespace the tests run in joins the bridge too (at ``.254``), so they talk to every host by its address as
any client on the network would.

Every name carries this process's id, so two runs on one machine do not collide, and :meth:`Network.close`
kills what runs in the namespaces and deletes them (the veths go with them); it also runs at exit, and a new
Network first removes what a run that died left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "fsnet"
"""Every namespace and root-side link this harness makes starts with this, then the owning process's id."""


def run_ip(*args: str, netns: str | None = None) -> str:
    """``ip ARGS`` (inside ``netns`` when given); raises with ip's own message when it fails."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str:
    """Why namespaces cannot be made here ("" when they can): not root, no ip, or no permission to use them."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        run_ip("netns", "add", probe)
    except FileNotFoundError:
        return "iproute2's ip is not installed"
    except RuntimeError as exc:
        return f"cannot make a network namespace: {exc}"
    run_ip("netns", "del", probe)
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL every process that runs in ``netns``."""
    try:
        pids = run_ip("netns", "pids", netns).split()
    except RuntimeError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_leftovers() -> None:
    """Delete the namespaces and root-side links of runs whose process is gone."""
    owned = re.compile(rf"^{PREFIX}(\d+)")
    for line in run_ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = owned.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    for line in run_ip("-o", "link", "show").splitlines():
        fields = line.split(":")
        name = fields[1].strip().split("@")[0] if len(fields) > 1 else ""
        match = owned.match(name)
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


@dataclass
class Host:
    """One namespace on the network: ``address`` is its eth0's IPv4 address."""

    name: str
    netns: str
    address: str
    switch: str
    """The switch namespace, where the far end of this host's cable (``port``) is."""
    port: str

    @property
    def inside(self) -> tuple[str, ...]:
        """The command that runs the command after it inside this host."""
        return ("ip", "netns", "exec", self.netns)

    def cut(self) -> None:
        """Take this host off the network: its switch port goes down (its own eth0 loses carrier)."""
        run_ip("link", "set", self.port, "down", netns=self.switch)

    def restore(self) -> None:
        """Put it back on the network."""
        run_ip("link", "set", self.port, "up", netns=self.switch)


class Network:
    """A bridge in a switch namespace, hosts on it, and the tests' own namespace on it at ``.254``."""

    def __init__(self):
        remove_leftovers()
        pid = os.getpid()
        self.tag = f"{PREFIX}{pid}"
        third = 16 + pid % 200  # 10.213.16.0/24 .. 10.213.215.0/24: one /24 per run, away from common ranges
        self.subnet = f"10.213.{third}"
        self.switch = f"{self.tag}sw"
        self.hosts: list[Host] = []
        self.client_link = f"{self.tag}c"  # at most 15 characters for a pid of up to 8 digits
        self.closed = False
        atexit.register(self.close)
        try:
            run_ip("netns", "add", self.switch)
            run_ip("link", "add", "br0", "type", "bridge", netns=self.switch)
            run_ip("link", "set", "br0", "up", netns=self.switch)
            run_ip("link", "add", self.client_link, "type", "veth", "peer", "name", "client", "netns", self.switch)
            run_ip("link", "set", "client", "master", "br0", netns=self.switch)
            run_ip("link", "set", "client", "up", netns=self.switch)
            run_ip("addr", "add", f"{self.subnet}.254/24", "dev", self.client_link)
            run_ip("link", "set", self.client_link, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        """A new host at the next address (``.1``, ``.2``, ...)."""
        number = len(self.hosts) + 1
        netns = f"{self.tag}{name}"
        host = Host(name, netns, f"{self.subnet}.{number}", self.switch, f"p{number}")
        run_ip("netns", "add", netns)
        self.hosts.append(host)
        run_ip("link", "set", "lo", "up", netns=netns)
        run_ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", host.port, "netns", self.switch)
        run_ip("link", "set", host.port, "master", "br0", netns=self.switch)
        run_ip("link", "set", host.port, "up", netns=self.switch)
        run_ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=netns)
        run_ip("link", "set", "eth0", "up", netns=netns)
        return host

    def close(self) -> None:
        """Kill every process in the hosts, delete the namespaces and the tests' link to the bridge."""
        if self.closed:
            return
        self.closed = True
        for netns in [h.netns for h in self.hosts] + [self.switch]:
            _kill_inside(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.client_link], capture_output=True, timeout=30)
