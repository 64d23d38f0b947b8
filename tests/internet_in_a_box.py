"""An internet in a box: network namespaces joined by a bridge, with a home behind NAT.

    with InternetInABox() as box:
        server = box.popen("public1", ["petald", "serve", "--listen", f"/ip4/{box.address('public1')}/tcp/0", ...])
        box.run("client", ["petald", "generate", ...])

Every host is a network namespace of its own (named with a prefix unique to this box, so boxes of
parallel runs never collide), with loopback up. Nothing is created in the root namespace: the
machine's own network is untouched.

The hosts:

- ``internet`` (not a host you run things on): a namespace holding one bridge, ``br0``, the
  internet's single link. Every public address below sits on it, in ``INTERNET`` (203.0.113.0/24,
  a documentation range: it is reachable only inside the box).
- ``public1``, ``public2``: public hosts, dialable by anyone on the internet.
- ``client``: a public host too, meant for the client process.
- ``home_router``: a home's NAT router. Its WAN leg ``wan`` is on the internet (a public address,
  ``box.address("home_router")``); its LAN leg ``lan`` holds the LAN's .1. nftables masquerades
  what leaves by ``wan`` and drops every new connection that comes in by it (to the router or to
  the LAN): only established/related traffic enters, like a home router with no port forwarding.
- ``home``: a host on that LAN (``box.address("home")`` is its private address). It dials out
  through the router; nobody on the internet can dial it.

``box.add_home("home2")`` adds another NATed home (``home2`` behind ``home2_router``, its own LAN),
for relay and hole-punching experiments; ``box.add_public("public3")`` another public host.
The NAT is Linux conntrack's: mappings keep the source port where it is free, and filtering is
per (address, port) of the remote end, so TCP hole punching (simultaneous open) can get through.

Links can be capped with tbf (``box.limit_bandwidth(host, mbps)``, both directions); the kernel
here has no netem, so delay comes from ``benchmarks/delay_proxy.py``.

The box needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` (iproute2), ``nft`` (nftables) and
``tc``; ``require_internet_in_a_box()`` skips a test with the reason where one is missing. On exit,
even after a failure or Ctrl-C, the box stops the processes it started and deletes its namespaces
(which deletes their links); a box whose owning process died is swept by the next box.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

INTERNET = ipaddress.ip_network("203.0.113.0/24")
_PREFIX = "ibox"  # namespaces are named ibox<pid>n<number>-<host>
_OWNED = re.compile(rf"^{_PREFIX}(\d+)n\d+-")
_numbers = itertools.count()


@dataclass
class Host:
    name: str
    namespace: str
    address: str  # its IPv4: public for public hosts and routers, the LAN one for a home
    link: str  # its interface towards the rest of the world (eth0, or wan for a router)
    peer_link: str | None  # the other end of that link, on the internet bridge (None for a home)


class InternetInABox:
    """The box; use it as a context manager. ``publics`` and ``homes`` name the hosts it starts
    with (each home comes with ``<home>_router``)."""

    def __init__(self, publics: Sequence[str] = ("public1", "public2", "client"), homes: Sequence[str] = ("home",),
                 bandwidth_mbps: dict[str, float] | None = None):
        self.prefix = f"{_PREFIX}{os.getpid()}n{next(_numbers)}-"
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen] = []
        self._namespaces: list[str] = []  # every one asked for, built or half-built: close deletes them
        self._initial = (list(publics), list(homes), dict(bandwidth_mbps or {}))
        self._next_public = 10  # 203.0.113.10, .11, ...
        self._next_lan = 1  # 192.168.1.0/24, 192.168.2.0/24, ...
        self._internet = self.prefix + "internet"

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> InternetInABox:
        sweep_orphaned_boxes()
        try:
            self._build()
        except BaseException:  # Ctrl-C too: never leave half a box behind
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        publics, homes, bandwidth = self._initial
        self._add_namespace(self._internet)
        _ip("-n", self._internet, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._internet, "link", "set", "br0", "up")
        for name in publics:
            self.add_public(name)
        for name in homes:
            self.add_home(name)
        for name, mbps in bandwidth.items():
            self.limit_bandwidth(name, mbps)

    def close(self) -> None:
        """Stop every process started in the box, then delete its namespaces. Safe to call twice."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in self._namespaces:
            _delete_namespace(namespace)
        self._namespaces.clear()
        self.hosts.clear()

    # -- building -----------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if name in self.hosts or name == "internet" or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"host name {name!r}: taken, or not lower-case letters, digits and _")

    def _new_namespace(self, name: str) -> str:
        self._check_name(name)
        return self._add_namespace(self.prefix + name)

    def _add_namespace(self, namespace: str) -> str:
        self._namespaces.append(namespace)  # first, so that a failure from here on still deletes it
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _public_address(self) -> str:
        address = INTERNET.network_address + self._next_public
        if address not in INTERNET or address == INTERNET.broadcast_address:
            raise RuntimeError(f"the box's internet {INTERNET} is full")
        self._next_public += 1
        return str(address)

    def _plug_into_internet(self, namespace: str, link: str) -> tuple[str, str]:
        """A veth from ``namespace`` (named ``link`` there) to the bridge; returns (address, bridge end)."""
        address = self._public_address()
        peer = f"v{address.rsplit('.', 1)[1]}"  # the bridge end, named after the host's last octet
        _ip("-n", namespace, "link", "add", link, "type", "veth", "peer", "name", peer, "netns", self._internet)
        _ip("-n", self._internet, "link", "set", peer, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{INTERNET.prefixlen}", "dev", link)
        _ip("-n", namespace, "link", "set", link, "up")
        return address, peer

    def add_public(self, name: str) -> Host:
        """A host with a public address on the internet."""
        namespace = self._new_namespace(name)
        address, peer = self._plug_into_internet(namespace, "eth0")
        self.hosts[name] = host = Host(name, namespace, address, "eth0", peer)
        return host

    def add_home(self, name: str) -> Host:
        """A host ``name`` on a LAN of its own behind a NAT router ``<name>_router``."""
        router_name = f"{name}_router"
        self._check_name(name)
        self._check_name(router_name)
        router = self._new_namespace(router_name)
        wan_address, peer = self._plug_into_internet(router, "wan")
        self.hosts[router_name] = Host(router_name, router, wan_address, "wan", peer)
        lan = ipaddress.ip_network(f"192.168.{self._next_lan}.0/24")
        self._next_lan += 1
        gateway, address = str(lan.network_address + 1), str(lan.network_address + 2)
        home = self._new_namespace(name)
        _ip("-n", home, "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns", router)
        _ip("-n", router, "addr", "add", f"{gateway}/{lan.prefixlen}", "dev", "lan")
        _ip("-n", router, "link", "set", "lan", "up")
        _ip("-n", home, "addr", "add", f"{address}/{lan.prefixlen}", "dev", "eth0")
        _ip("-n", home, "link", "set", "eth0", "up")
        _ip("-n", home, "route", "add", "default", "via", gateway)
        _run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        _run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=NAT_RULES)
        self.hosts[name] = host = Host(name, home, address, "eth0", None)
        return host

    def limit_bandwidth(self, name: str, mbps: float) -> None:
        """Cap ``name``'s link to ``mbps`` Mbit/s each way (tbf at both ends of its link; a home's
        link is its router's: the home shares it, as a home does)."""
        if not 0 < mbps < float("inf"):
            raise ValueError(f"bandwidth cap for {name}: {mbps!r} is not a positive number of Mbit/s")
        host = self.hosts[f"{name}_router"] if self.hosts[name].peer_link is None else self.hosts[name]
        assert host.peer_link is not None
        rate = f"{mbps}mbit"
        burst = f"{max(1600, int(mbps * 1e6 / 8 / 250))}"  # about 4 ms of traffic, at least one packet
        for namespace, link in ((host.namespace, host.link), (self._internet, host.peer_link)):
            _ip("-n", namespace, "link", "set", link, "up")
            _run(["tc", "-n", namespace, "qdisc", "replace", "dev", link, "root", "tbf", "rate", rate,
                  "burst", burst, "latency", "50ms"])

    # -- using --------------------------------------------------------------------------------

    def address(self, host: str) -> str:
        """``host``'s IPv4 address: public for public hosts and routers, private for a home."""
        return self.hosts[host].address

    def namespace(self, host: str) -> str:
        return self.hosts[host].namespace

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; the box stops it on exit if it still runs."""
        process = subprocess.Popen(self.command(host, argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(argv)`` inside ``host``."""
        return subprocess.run(self.command(host, argv), **kwargs)


NAT_RULES = """
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
table inet firewall {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
}
"""


def _run(argv: Sequence[str], input: str | None = None) -> None:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _delete_namespace(namespace: str) -> None:
    """Delete ``namespace`` if it exists; its links go with it (the other end of a veth too)."""
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def sweep_orphaned_boxes() -> None:
    """Delete namespaces of boxes whose process no longer runs (it was killed before its cleanup)
    and in which nothing runs any more."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        namespace = line.split()[0] if line.split() else ""
        owner = _OWNED.match(namespace)
        if owner and not os.path.exists(f"/proc/{owner.group(1)}"):
            inside = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
            if not inside.strip():
                _delete_namespace(namespace)


@lru_cache(maxsize=1)
def why_no_internet_in_a_box(euid: int | None = None,
                             which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why a box cannot be built here (None: it can). ``euid`` and ``which`` stand in for this
    process's effective user id and the PATH lookup of a tool (a test gives others)."""
    if euid is None:
        euid = os.geteuid() if hasattr(os, "geteuid") else -1
    if euid != 0:
        return "the internet in a box needs root (network namespaces, veths, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if which(tool) is None:
            return f"the internet in a box needs `{tool}`: apt-get install -y {package}"
    probe = f"{_PREFIX}{os.getpid()}n{next(_numbers)}-probe"
    try:
        _ip("netns", "add", probe)
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=NAT_RULES.replace('"wan"', '"lo"'))
    except RuntimeError as error:
        return f"cannot build network namespaces with NAT here: {error}"
    finally:
        _delete_namespace(probe)
    return None


def require_internet_in_a_box() -> None:
    """Skip the calling test, saying why, where the box cannot be built."""
    import pytest

    reason = why_no_internet_in_a_box()
    if reason is not None:
        pytest.skip(reason)
