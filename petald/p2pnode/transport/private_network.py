"""Private swarms: every connection is wrapped in the swarm key before anything else is said.

libp2p's private networks (pnet): each side sends a random 24-byte nonce, then everything it
writes is XOR-ed with the XSalsa20 stream of (swarm key, its nonce). multistream-select, Noise
and yamux all run inside, so a peer without the key sees random bytes from the first one on:
it learns no protocol, peer ID, record or block.

Why not py-libp2p 0.8.1's own pnet (``new_host(psk=...)``): it wraps TCP dials and listens and
inbound relayed connections, but not outbound relayed ones (``upgrade_outbound_raw_conn``), so
a relayed connection between two keyed nodes is wrapped on one end only and fails; its wrapper is
Salsa20 with an 8-byte nonce (the spec says XSalsa20 with 24); and a wrong key is found only when
multistream-select chokes on noise, which can take until a timeout with no word of why. Here
one wrapper sits at the one place every connection passes (the upgrader's ``upgrade_security``:
TCP dials and listens, relayed circuits both ways, hole-punched connections, dial-backs), and
the first bytes inside the stream are a fixed check, so a wrong key or none is named within
``KEY_CHECK_TIMEOUT_S`` on both sides. (The check is our addition to the spec's wire: a
go-libp2p pnet node cannot join, which costs nothing, as it speaks none of petald's protocols.)

XSalsa20 is HSalsa20 (a key derivation from the first 16 bytes of the nonce, below) followed by
Salsa20 with the last 8: pycryptodome (a py-libp2p dependency) has Salsa20 but no HSalsa20.
"""

from __future__ import annotations

import os
import struct
import weakref
from typing import Any

import trio
from Crypto.Cipher import Salsa20
from libp2p.abc import IHost, IRawConnection
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.transport.exceptions import SecurityUpgradeFailure

from petald.p2pnode.transport.swarm_key import SwarmKey

NONCE_BYTES = 24
KEY_CHECK = b"/petald/pnet/1\n\x00"  # the first bytes inside every private connection
KEY_CHECK_TIMEOUT_S = 4.0  # a peer that has not proved the key by then is not in this swarm
# What a node without a key sends first (multistream-select's header): named at once, not timed out.
PLAIN_LIBP2P_START = b"\x13/multistream/1.0.0\n"
# py-libp2p retries a failed dial 3 times: a peer that just failed the check fails the retries at
# once instead of waiting out the check again.
MISMATCH_MEMORY_S = 10.0
_MASK = 0xFFFFFFFF


# The key each private host was given (``describe_connect_failure`` asks whether it has one).
_HOST_KEYS: weakref.WeakKeyDictionary[IHost, SwarmKey] = weakref.WeakKeyDictionary()


class SwarmKeyMismatch(SecurityUpgradeFailure):
    """The peer is not in this private swarm (another key, or none)."""


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & _MASK


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """HSalsa20 (Bernstein, "Extending the Salsa20 nonce"): 20 Salsa20 rounds over the constant,
    the key and 16 nonce bytes; words 0, 5, 10, 15, 6, 7, 8, 9 of the result are the subkey."""
    c = struct.unpack("<4I", b"expand 32-byte k")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [c[0], *k[:4], c[1], *n, c[2], *k[4:], c[3]]
    quarters = ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),  # columns
                (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14))  # rows
    for _ in range(10):
        for a, b, cc, d in quarters:
            x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
            x[cc] ^= _rotl((x[b] + x[a]) & _MASK, 9)
            x[d] ^= _rotl((x[cc] + x[b]) & _MASK, 13)
            x[a] ^= _rotl((x[d] + x[cc]) & _MASK, 18)
    return struct.pack("<8I", *(x[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))


def xsalsa20(key: bytes, nonce: bytes) -> Any:
    """A stateful XSalsa20 keystream cipher (``encrypt``/``decrypt`` XOR the next bytes)."""
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


class PrivateConnection(RawConnection):
    """A raw connection inside the swarm key; ``open`` exchanges nonces and checks the key."""

    def __init__(self, inner: IRawConnection, is_initiator: bool, key: SwarmKey) -> None:
        addresses = inner.get_transport_addresses() if hasattr(inner, "get_transport_addresses") else None
        kind = inner.get_connection_type() if hasattr(inner, "get_connection_type") else None
        super().__init__(stream=inner, initiator=is_initiator, addresses=addresses,  # type: ignore[arg-type]
                         **({"connection_type": kind} if kind is not None else {}))
        self.inner, self._key = inner, key
        nonce = os.urandom(NONCE_BYTES)
        self._nonce, self._send = nonce, xsalsa20(key.secret, nonce)
        self._receive: Any = None
        self._pending = b""  # bytes read past the peer's check, given out by the first reads

    async def open(self) -> None:
        await self.inner.write(self._nonce + self._send.encrypt(KEY_CHECK))
        wanted = NONCE_BYTES + len(KEY_CHECK)
        got = b""
        with trio.move_on_after(KEY_CHECK_TIMEOUT_S):
            while len(got) < wanted:
                try:
                    data = await self.inner.read(wanted - len(got))
                except Exception:  # reset, or closed mid-read: the same as a close here
                    data = b""
                if not data:
                    raise SwarmKeyMismatch("the peer closed the connection at the swarm-key check: it is not "
                                           "in this private swarm (another --swarm-key, or none)")
                got += data
                if got[:len(PLAIN_LIBP2P_START)] == PLAIN_LIBP2P_START:  # 2**-160 for a random nonce
                    raise SwarmKeyMismatch("the peer has no swarm key: it is not in this private swarm")
        if len(got) < wanted:
            raise SwarmKeyMismatch(f"the peer did not prove the swarm key within {KEY_CHECK_TIMEOUT_S:.0f} s: "
                                   "it is not in a private swarm (it runs without --swarm-key)")
        self._receive = xsalsa20(self._key.secret, got[:NONCE_BYTES])
        if self._receive.decrypt(got[NONCE_BYTES:]) != KEY_CHECK:
            raise SwarmKeyMismatch("the peer holds another swarm key (or none): it is not in this private "
                                   f"swarm (this node's key is {self._key.fingerprint})")

    async def write(self, data: bytes) -> None:
        await self.inner.write(self._send.encrypt(data))

    async def read(self, n: int | None = None) -> bytes:
        data = await self.inner.read(n)
        return self._receive.decrypt(data) if data else b""

    async def close(self) -> None:
        await self.inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.inner.get_remote_address()


def install_private_network(host: IHost, key: SwarmKey) -> None:
    """Every connection of ``host``, in and out, direct and relayed, passes the swarm key first."""
    _HOST_KEYS[host] = key
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    library_upgrade = upgrader.upgrade_security
    mismatches: dict[ID, tuple[float, SwarmKeyMismatch]] = {}  # peers dialled lately that failed the check

    async def upgrade_security(raw_conn: IRawConnection, is_initiator: bool, peer_id: ID | None = None) -> Any:
        now = trio.current_time()
        for stale in [p for p, (when, _) in mismatches.items() if now - when > MISMATCH_MEMORY_S]:
            del mismatches[stale]
        private = PrivateConnection(raw_conn, is_initiator, key)
        try:
            if peer_id is not None and peer_id in mismatches:
                raise mismatches[peer_id][1]
            await private.open()
        except BaseException as exc:
            if isinstance(exc, SwarmKeyMismatch) and peer_id is not None:
                mismatches[peer_id] = (now, exc)
            with trio.move_on_after(1.0) as cleanup:
                cleanup.shield = True
                await raw_conn.close()
            raise
        return await library_upgrade(private, is_initiator, peer_id)

    upgrader.upgrade_security = upgrade_security


def private_swarm_hint(exc: BaseException, has_key: bool) -> str | None:
    """What a failed connection says about the swarm key, or None if nothing.

    With a key, a SwarmKeyMismatch anywhere in the failure (its causes, and the per-address
    failures py-libp2p gathers in a MultiError) is named. Without one, a peer that broke off
    before the secure protocol was agreed is most likely a private swarm's node."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, SwarmKeyMismatch):
            return str(error)
        if not has_key and isinstance(error, SecurityUpgradeFailure) \
                and "failed to negotiate the secure protocol" in str(error):
            return ("the peer broke off before the secure handshake: it is likely in a private swarm, "
                    "whose nodes need its key (--swarm-key FILE)")
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        pending.extend(getattr(error, "errors", None) or getattr(error, "exceptions", None) or ())
    return None


def swarm_key_hint(host: IHost, exc: BaseException) -> str | None:
    """What ``host``'s failed connection says about the swarm key (``private_swarm_hint``)."""
    return private_swarm_hint(exc, host in _HOST_KEYS)


def describe_connect_failure(host: IHost, exc: BaseException) -> str:
    """Why ``host`` could not connect to a peer, in a sentence: the swarm key's part when it had one."""
    return swarm_key_hint(host, exc) or str(exc) or type(exc).__name__
