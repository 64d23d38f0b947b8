"""What one peer may take of a server: sessions, KV cache, steps and bytes per second, training
tokens per second (issue 22, "Per-peer limits"; docs/security.md).

Counts and shares are refused at a session's open: too many sessions at once is ``busy``, more
than the peer's share of the KV cache is ``quota`` (``too_large`` for one session over the share by
itself: no wait helps). Rates are paced, not refused: a step that would take a peer past its
steps or bytes per second waits until it is within them (the peer's sessions slow down, the
others' do not), and a training request that would wait longer than the server's open timeout is
refused with ``quota``. A peer is its libp2p peer ID (the key its Noise handshake proved), so a
relay cannot lend its own limits to others, and one peer's sessions share one account.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from petald.kernels.executor import DEFAULT_PREFILL_CHUNK
from petald.protocol.errors import ErrorCode, ProtocolError

BURST_S = 1.0  # a peer may go ahead of its rate by this many seconds' worth
SWEEP_ABOVE = 1024  # accounts kept before the idle ones are forgotten (peers come and go without end)


@dataclass
class PeerLimits:
    sessions: int = 32  # inference sessions at once (a local API serving many people is one peer)
    cache_share: float = 0.5  # of the server's KV pages
    steps_per_s: float = 200.0  # a step of T tokens counts ceil(T / prefill chunk): the executor's turns it takes
    bytes_per_s: float = 50e6  # received, frames included
    training_tokens_per_s: float = 16384.0  # batch x tokens of training requests


class TokenBucket:
    """``rate`` per second, up to ``BURST_S`` seconds' worth ahead; a take beyond it is owed, and
    ``take`` says how long the taker must wait to have paid it."""

    def __init__(self, rate: float):
        self.rate = rate
        self.level = rate * BURST_S
        self.at = trio.current_time()

    def take(self, amount: float) -> float:
        now = trio.current_time()
        self.level = min(self.rate * BURST_S, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= amount
        return max(0.0, -self.level / self.rate)

    def give_back(self, amount: float) -> None:
        """Undo a ``take`` whose work was refused."""
        self.level += amount

    @property
    def full(self) -> bool:
        return self.level + (trio.current_time() - self.at) * self.rate >= self.rate * BURST_S


@dataclass
class PeerAccount:
    steps: TokenBucket
    bytes: TokenBucket
    training: TokenBucket
    sessions: int = 0
    pages: int = 0  # KV pages its sessions reserved

    @property
    def idle(self) -> bool:
        """Nothing open and nothing owed: forgetting it changes nothing."""
        return self.sessions == 0 and self.steps.full and self.bytes.full and self.training.full


class PeerLedger:
    def __init__(self, limits: PeerLimits, num_pages: int):
        self.limits, self.num_pages = limits, num_pages
        self._accounts: dict[str, PeerAccount] = {}

    @property
    def share_pages(self) -> int:
        return max(1, int(self.num_pages * self.limits.cache_share))

    def _account(self, peer: str) -> PeerAccount:
        account = self._accounts.get(peer)
        if account is None:
            if len(self._accounts) >= SWEEP_ABOVE:
                self._accounts = {p: a for p, a in self._accounts.items() if not a.idle}
            limits = self.limits
            account = self._accounts[peer] = PeerAccount(TokenBucket(limits.steps_per_s), TokenBucket(limits.bytes_per_s),
                                                         TokenBucket(limits.training_tokens_per_s))
        return account

    def open_session(self, peer: str, pages: int) -> None:
        """Count a session of ``peer`` reserving ``pages``, or refuse it (nothing counted)."""
        account, limits = self._account(peer), self.limits
        if pages > self.share_pages:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"the session needs {pages} KV pages; one peer may hold at most "
                                                     f"{self.share_pages} of this server's {self.num_pages}")
        if account.sessions >= limits.sessions:
            raise ProtocolError(ErrorCode.BUSY, f"this peer has {account.sessions} sessions open here, the most one "
                                                "peer may; close one or use another server")
        if account.pages + pages > self.share_pages:
            raise ProtocolError(ErrorCode.QUOTA, f"this peer's sessions hold {account.pages} of this server's "
                                                 f"{self.num_pages} KV pages and this one needs {pages}; one peer may "
                                                 f"hold {self.share_pages}: close a session or use another server")
        account.sessions += 1
        account.pages += pages

    def close_session(self, peer: str, pages: int) -> None:
        account = self._accounts.get(peer)
        if account is None:
            return
        account.sessions -= 1
        account.pages -= pages
        self._forget_if_idle(peer, account)

    async def pace_step(self, peer: str, tokens: int, nbytes: int) -> None:
        """Wait until a step of ``tokens`` tokens that brought ``nbytes`` is within ``peer``'s rates."""
        account = self._account(peer)
        wait = max(account.steps.take(math.ceil(tokens / DEFAULT_PREFILL_CHUNK)), account.bytes.take(nbytes))
        if wait > 0:
            await trio.sleep(wait)

    async def pace_training(self, peer: str, tokens: int, nbytes: int, longest_wait: float) -> None:
        """Wait until a training request is within ``peer``'s rates; refuse it (``quota``) when that
        would take longer than ``longest_wait`` seconds."""
        account = self._account(peer)
        wait = max(account.training.take(tokens), account.bytes.take(nbytes))
        if wait > longest_wait:
            account.training.give_back(tokens)
            account.bytes.give_back(nbytes)
            raise ProtocolError(ErrorCode.QUOTA, f"this peer sent more than its {self.limits.training_tokens_per_s:.0f} "
                                                 f"training tokens per second; retry in {wait:.0f} s")
        await trio.sleep(wait)

    def _forget_if_idle(self, peer: str, account: PeerAccount) -> None:
        if account.idle:
            self._accounts.pop(peer, None)
