"""A TCP listen port a node holds alone: refused at start when something else holds it.

py-libp2p sets SO_REUSEPORT on its listeners (hole punching dials out from the listen port), so
a second petald given the same ``--listen`` port would bind it too and the kernel would split
incoming connections between two peer IDs. Two checks keep the port ours:

- before listening, ``refuse_taken_ports`` binds a probe socket without SO_REUSEPORT: the kernel
  refuses it while any socket (petald's or a foreign one) listens on the port;
- after listening, ``refuse_shared_ports`` counts the listening sockets on each port in this
  network namespace (``/proc/net/tcp*``, Linux): more than our own means a second node bound it
  in the instant between its probe and ours, and both refuse to go on.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

import multiaddr

_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


class PortInUse(OSError):
    """A ``--listen`` port something else listens on; the message says what to do."""


def _tcp_endpoint(address: str) -> tuple[int, str, int] | None:
    """(family, ip, port) of an /ip4 or /ip6 .../tcp/PORT multiaddr, None for any other."""
    try:
        maddr = multiaddr.Multiaddr(address)
        names = [p.name for p in maddr.protocols()]
        if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
            return None
        family = socket.AF_INET if names[0] == "ip4" else socket.AF_INET6
        return family, maddr.value_for_protocol(names[0]), int(maddr.value_for_protocol("tcp"))
    except Exception:
        return None  # py-libp2p reports addresses it cannot listen on


def _in_use_message(ip: str, port: int) -> str:
    return (f"port {port} on {ip} is already in use (another petald, or another program): "
            "choose another --listen port, or stop what holds it")


def refuse_taken_ports(listen: Sequence[str]) -> None:
    """Raise PortInUse for the first listen address whose fixed TCP port is already held."""
    for address in listen:
        endpoint = _tcp_endpoint(address)
        if endpoint is None or endpoint[2] == 0:
            continue  # port 0: the kernel picks a free one
        family, ip, port = endpoint
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR lets a restarted node bind past its old connections in TIME_WAIT; it
            # never lets two sockets listen on one port (only SO_REUSEPORT on both would).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(_in_use_message(ip, port)) from None
                raise OSError(f"--listen {address}: cannot listen there ({exc.strerror}); "
                                         "is the address one of this host's?") from None


def _listening_sockets(family: int) -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of ``family`` in this network namespace."""
    table = Path("/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6")
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return []  # not Linux, or no IPv6: the probe before listening is the only check
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _TCP_LISTEN:
            continue
        hex_ip, hex_port = fields[1].split(":")
        raw = bytes.fromhex(hex_ip)
        # The kernel prints each 32-bit word of the address in host (little-endian) order.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        out.append((str(ipaddress.ip_address(words)), int(hex_port, 16)))
    return out


def refuse_shared_ports(bound: Iterable[str]) -> None:
    """Raise PortInUse when a port we listen on (``bound``: our own listen addresses, one per
    socket) has more listening sockets in this namespace than we opened on it."""
    ours: dict[tuple[int, str, int], int] = {}
    for address in bound:
        endpoint = _tcp_endpoint(address)
        if endpoint is not None:
            key = (endpoint[0], str(ipaddress.ip_address(endpoint[1])), endpoint[2])
            ours[key] = ours.get(key, 0) + 1
    tables = {family: _listening_sockets(family) for family in {key[0] for key in ours}}
    for (family, ip, port), count in ours.items():
        if sum(1 for entry in tables[family] if entry == (ip, port)) > count:
            raise PortInUse(_in_use_message(ip, port))
