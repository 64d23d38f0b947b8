"""Which addresses a node announces (in identify, in the DHT, in its "serving ... at" lines).

The rule, written once here:

- ``--announce`` given: exactly those addresses (port forwarding, a proxy in front of the node);
  the listen addresses are not announced.
- Otherwise the bound listen addresses (port 0 replaced by the real port), with a wildcard
  (``0.0.0.0`` or ``::``) replaced by this host's interface addresses of that family that are
  up. Nobody can dial ``0.0.0.0``; link-local addresses need a zone or a shared link, so they
  are dropped too.
- Loopback (``127.0.0.0/8``, ``::1``) is announced only inside a loopback swarm: a node that
  listens on loopback only, or whose initial peers are all loopback. Elsewhere a loopback
  address points every other host at itself. A host with no other address keeps its loopback
  ones (it can only be in a loopback swarm).
- Order: the addresses most likely to answer first (loopback inside a loopback swarm, then
  global, then private), since a dialler tries them in order. Addresses that peers confirmed
  they saw us at (py-libp2p's identify, four observers or more) follow our own, under the same
  loopback rule: we never made them, so they are tried last.

``AddressPlan`` is what the host's ``addrs_factory`` calls; a later step (relay addresses,
reachability) extends ``AddressPlan.select``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import multiaddr
import psutil

_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_ANNOUNCE_FORM = "/ip4/A.B.C.D/tcp/PORT, /ip6/ADDR/tcp/PORT or /dns/NAME/tcp/PORT"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AnnounceError(ValueError):
    """An ``--announce`` address petald cannot announce; the message says why."""


def _ip_of(address: multiaddr.Multiaddr) -> IpAddress | None:
    """The IP of an /ip4 or /ip6 multiaddr, None for any other (dns, ...)."""
    first = address.protocols()[0].name
    if first not in ("ip4", "ip6"):
        return None
    return ipaddress.ip_address(address.value_for_protocol(first).split("%")[0])


def parse_announce(text: str, peer_id: str | None = None) -> multiaddr.Multiaddr:
    """An address to announce, checked: a host (ip4, ip6 or dns), a TCP port, and at most a
    /p2p/ part naming this node (``peer_id``, when known). Returned without the /p2p/ part."""
    try:
        address = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise AnnounceError(f"{text!r} is not a multiaddr ({exc}); expected {_ANNOUNCE_FORM}") from None
    names = [p.name for p in address.protocols()]
    if names[-1:] == ["p2p"]:
        own = address.value_for_protocol("p2p")
        if peer_id is not None and own != peer_id:
            raise AnnounceError(f"{text!r} names peer {own}, but this node is {peer_id}: "
                                "drop the /p2p/ part (petald adds its own)")
        address = address.decapsulate(multiaddr.Multiaddr(f"/p2p/{own}"))
        names = names[:-1]
    if len(names) != 2 or names[0] not in _HOST_PROTOCOLS or names[1] != "tcp":
        raise AnnounceError(f"{text!r}: petald announces TCP addresses, {_ANNOUNCE_FORM}")
    ip = _ip_of(address)
    if ip is not None and ip.is_unspecified:
        raise AnnounceError(f"{text!r}: nobody can dial {ip}; announce the address others reach "
                            "this node at")
    if int(address.value_for_protocol("tcp")) == 0:
        raise AnnounceError(f"{text!r}: announce the real port others connect to, not 0")
    return address


def _is_loopback_text(address: str) -> bool:
    try:
        ip = _ip_of(multiaddr.Multiaddr(address))
    except Exception:
        return False  # not ours to judge here: the caller's own parsing reports a bad address
    return ip is not None and ip.is_loopback


def is_loopback_swarm(listen: Sequence[str], initial_peers: Sequence[str]) -> bool:
    """A node is in a loopback swarm when it listens on loopback only, or when it joins through
    initial peers that are all loopback (a swarm on one machine)."""
    if listen and all(_is_loopback_text(a) for a in listen):
        return True
    return bool(initial_peers) and all(_is_loopback_text(a) for a in initial_peers)


def host_interface_ips() -> list[IpAddress]:
    """This host's addresses on interfaces that are up, in the system's order."""
    stats = psutil.net_if_stats()
    out: list[IpAddress] = []
    for name, entries in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                out.append(ipaddress.ip_address(entry.address.split("%")[0]))
    return out


def _expand(address: multiaddr.Multiaddr, interface_ips: Sequence[IpAddress]) -> list[multiaddr.Multiaddr]:
    """``address`` itself, or for a wildcard one each interface address of its family (same port)."""
    ip = _ip_of(address)
    if ip is None or not ip.is_unspecified:
        return [address]
    port = address.value_for_protocol("tcp")
    family = "ip4" if ip.version == 4 else "ip6"
    return [multiaddr.Multiaddr(f"/{family}/{i}/tcp/{port}") for i in interface_ips if i.version == ip.version]


def _preference(address: multiaddr.Multiaddr, loopback_first: bool) -> int:
    ip = _ip_of(address)
    if ip is None:
        return 1
    if ip.is_loopback:
        return 0 if loopback_first else 3
    return 1 if ip.is_global else 2


@dataclass
class AddressPlan:
    """What a node announces: ``announce`` (parsed ``--announce`` values) if any, else its
    listen addresses as the module's rule says. Called by py-libp2p as the host's
    ``addrs_factory`` with the bound listen addresses (and any confirmed observed ones)."""

    announce: Sequence[multiaddr.Multiaddr] = ()
    loopback_swarm: bool = True
    interface_ips: Callable[[], list[IpAddress]] = field(default=host_interface_ips)
    # The host's bound listen addresses (``make_host`` sets it to ``host.get_transport_addrs``);
    # candidates beyond them are observed ones. None: every candidate is a listen address.
    listening: Callable[[], Sequence[multiaddr.Multiaddr]] | None = None

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return self.select(candidates)

    def select(self, candidates: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        if self.announce:
            return list(self.announce)
        own = list(self.listening()) if self.listening is not None else list(candidates)
        wildcard = any(ip is not None and ip.is_unspecified for ip in map(_ip_of, own))
        interface_ips = self.interface_ips() if wildcard else []
        expanded = [address for candidate in own for address in _expand(candidate, interface_ips)]
        ours = sorted(self._usable(expanded), key=lambda a: _preference(a, self.loopback_swarm))
        observed = self._usable([c for c in candidates if str(c) not in {str(a) for a in own}])
        return list({str(a): a for a in [*ours, *observed]}.values())

    def _usable(self, addresses: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """Without link-local and wildcard addresses, and without loopback outside a loopback
        swarm (unless loopback is all there is)."""
        usable = [a for a in addresses
                  if (ip := _ip_of(a)) is None or not (ip.is_link_local or ip.is_unspecified)]
        if not self.loopback_swarm:
            beyond_loopback = [a for a in usable if not _is_loopback_text(str(a))]
            usable = beyond_loopback or usable  # a host with loopback alone keeps it
        return usable


def address_plan(listen: Sequence[str], initial_peers: Sequence[str] = (), announce: Sequence[str] = (),
                 peer_id: str | None = None) -> AddressPlan:
    """The plan for a node that listens on ``listen``, joins through ``initial_peers`` and was
    given ``announce`` (raw ``--announce`` values, checked here: AnnounceError)."""
    try:
        announced = [parse_announce(a, peer_id) for a in announce]
    except AnnounceError as exc:
        raise AnnounceError(f"--announce {exc}") from None
    return AddressPlan(announce=announced, loopback_swarm=is_loopback_swarm(listen, initial_peers))
