"""Run a server node until SIGINT or SIGTERM: join the swarm, place and load a span, announce, serve.

The order matters to clients: a server says "serving blocks A:B ... at ADDR" only once its
record says ``online``, so that line means "routable". Shutdown announces ``offline`` first.
With ``--blocks auto`` the server also rebalances: every ``rebalance_period`` (with jitter,
so that servers do not all move at once) it reads the swarm and moves when Petals' rule says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from petald.kernels.adapters.lora import load_lora_adapter
from petald.kernels.dtypes import dtype_name, resolve_device, resolve_dtype
from petald.kernels.executor import DeviceExecutor
from petald.kernels.memory_plan import available_memory, blocks_that_fit
from petald.kernels.quant import check_quant
from petald.kernels.quant_choice import choose_block_quant
from petald.kernels.sources.model_source import ModelSource
from petald.kernels.sources.open_source import describe_model, open_source
from petald.kernels.span import BlockSpan
from petald.kernels.throughput import cached_throughput, measure_throughput
from petald.p2pnode.routing.placement import (
    RebalanceSchedule,
    better_start,
    block_coverage,
    choose_start,
)
from petald.p2pnode.server.block_server import BlockServer, ServerLimits
from petald.p2pnode.server.fault_switch import FAULT_VARIABLE, FaultSwitch
from petald.p2pnode.server.reachability import ServerReachability
from petald.p2pnode.server.server_info import span_info
from petald.p2pnode.swarm.dht import SwarmDHT, block_key
from petald.p2pnode.swarm.membership import SwarmMembership
from petald.p2pnode.swarm.presence import ServerPresence
from petald.p2pnode.transport.announced_addresses import address_plan
from petald.p2pnode.transport.host import (
    DEFAULT_LISTEN,
    quiet_libp2p_logs,
    running_host,
)
from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of
from petald.p2pnode.transport.listen_port import refuse_taken_ports
from petald.p2pnode.transport.node_metrics import NodeMetrics
from petald.p2pnode.transport.swarm_key import SwarmKey
from petald.protocol.announcement import ServerAnnouncement
from petald.protocol.limits import MAX_ARRAY_LEN
from petald.protocol.messages import ServerInfo

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # of the free memory, when --blocks auto is given no budget
STEPS_FINISH_S = 30.0  # after the grace period, the longest wait for running steps to finish
# Saying "offline" on the way out: one DHT put (a lookup and a store, ~1 s at 100 ms round
# trips); a swarm that does not answer in time sees the record expire instead.
OFFLINE_RECORD_TIMEOUT_S = 5.0


@dataclass
class ServeOptions:
    model: str | None = None
    blocks: str = "auto"
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    announce_addrs: list[str] = field(default_factory=list)  # --announce: announced instead of the listen ones
    identity: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"  # vocabulary.QUANT_CHOICES; "auto": kernels/quant_choice.py
    adapters: list[str] = field(default_factory=list)  # PEFT LoRA adapter directories to serve
    limits: ServerLimits = field(default_factory=ServerLimits)
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # the node's, for GET /metrics beside it
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    num_blocks: int | None = None  # for --blocks auto
    memory_limit_gib: float | None = None  # for --blocks auto
    announce_period: float = 30.0
    rebalance_period: float = 60.0
    network_mbps: float = 0.0
    reachability: str = "auto"  # auto (peers dial back), public or private (server/reachability.py)
    direct_upgrade: bool = True  # DCUtR on relayed connections (transport/direct_upgrade.py)
    throughput_seconds: float = 1.0
    shutdown_grace: float = 30.0  # seconds running sessions may go on after SIGTERM
    swarm_key: SwarmKey | None = None  # a private swarm's key (transport/private_network.py)
    swarm_owner: str | None = None  # the peer ID whose signed member list admits peers (swarm/membership.py)
    # Runs beside the server once its first span is online (the CLI's local API, systemd readiness).
    on_online: Callable[[IHost, SwarmDHT], Awaitable[None]] | None = None
    # (what, done, total) while loading blocks and measuring throughput; None: a few announced lines.
    progress: Callable[[str, int, int], None] | None = None
    # Test-only: answer steps wrongly on purpose (server/fault_switch.py); None in every real server.
    faults: FaultSwitch | None = None


def parse_blocks(text: str, num_blocks: int | None) -> tuple[int, int]:
    """``A:B`` (B exclusive), ``A:`` for the rest, ``:B`` from the start. ``num_blocks`` None: the
    form alone is checked (before the model is opened; the range once it is)."""
    start_text, sep, end_text = text.partition(":")
    try:
        start = int(start_text) if start_text else 0
        end = int(end_text) if end_text else (num_blocks or 0)
    except ValueError:
        raise ValueError(f"--blocks {text!r}: expected A:B with integers (e.g. 0:15) or auto") from None
    if num_blocks is None:
        return start, end
    if not sep or not 0 <= start < end <= num_blocks:
        raise ValueError(f"--blocks {text!r}: need 0 <= A < B <= {num_blocks} (this model has {num_blocks} blocks)")
    return start, end


def check_num_blocks(options: ServeOptions, total: int) -> None:
    if options.num_blocks is not None and not 1 <= options.num_blocks <= total:
        raise ValueError(f"--num-blocks {options.num_blocks}: this model has {total} blocks")


def auto_block_count(options: ServeOptions, source: ModelSource, dtype: torch.dtype,
                     device: torch.device) -> int:
    check_num_blocks(options, source.identity.num_blocks)
    if options.num_blocks is not None:
        return options.num_blocks
    if options.memory_limit_gib is not None:
        budget = int(options.memory_limit_gib * 2**30)
    else:
        budget = int(available_memory(device) * MEMORY_SHARE)
    count = blocks_that_fit(source.config, dtype, budget, options.limits.cache_tokens, options.quant)
    if count < 1:
        raise ValueError(f"not even one block fits in {budget / 2**30:.2f} GiB beside a KV cache of "
                         f"{options.limits.cache_tokens} tokens: raise --memory-limit or lower --cache-tokens")
    return count


def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> None:
    """Load, listen, serve; return after a signal once everything is closed."""
    quiet_libp2p_logs()
    address_plan(options.listen, options.initial_peers, options.announce_addrs)  # bad --announce: fail before loading
    refuse_taken_ports(options.listen)  # and a port in use too (running_host checks again)
    faults = FaultSwitch.from_environment(options.listen, options.initial_peers, options.announce_addrs)
    if faults is not None:
        announce(f"WARNING: test fault switch on ({FAULT_VARIABLE}): this server answers steps wrongly on "
                 f"purpose ({faults.describe()}); it is for petald's tests only")
        options = dataclasses.replace(options, faults=faults)
    # What needs no model is checked before it is opened (a large one takes a while).
    if not options.initial_peers and not options.new_swarm:
        raise ValueError("a server joins a swarm: pass --initial-peers ADDR (any node of the swarm), "
                         "or --new-swarm to start a new one")
    if options.blocks != "auto":
        parse_blocks(options.blocks, None)
    announce(f"opening model {describe_model(options.model)}")
    source = open_source(options.model)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    # Before loading anything (for auto, the device and PETALD_CPU_KERNELS alone; its modes are checked as measured).
    check_quant("none" if options.quant == "auto" else options.quant, device)
    adapter_names = check_adapters(options.adapters, source, dtype)
    if options.blocks == "auto":
        fixed = None
        check_num_blocks(options, source.identity.num_blocks)
    else:
        fixed = parse_blocks(options.blocks, source.identity.num_blocks)
    if options.quant == "auto":  # measured once the cheap checks passed, before the memory plan counts bytes
        choice = choose_block_quant(source, dtype, device, announce)
        announce(choice.describe("--quant"))
        options = dataclasses.replace(options, quant=choice.chosen)
    length = auto_block_count(options, source, dtype, device) if fixed is None else fixed[1] - fixed[0]
    key_pair = load_or_create_identity(options.identity)
    node = ServerNode(options, source, dtype, device, announce, adapter_names)
    try:
        trio.run(node.run, key_pair, length, fixed)
    finally:
        node.shut_down_executors()
    announce(f"stopped ({dtype_name(dtype)}, quant {options.quant}, on {device})")


def check_adapters(paths: list[str], source: ModelSource, dtype: torch.dtype) -> list[str]:
    """Read every adapter for the whole model before any block loads: a wrong path, format or model
    fails now, with AdapterError's sentence, and two adapters of one name are refused. Returns
    their names."""
    if len(paths) > MAX_ARRAY_LEN:
        raise ValueError(f"{len(paths)} --adapters given; a server announces at most {MAX_ARRAY_LEN}")
    names: dict[str, str] = {}
    for path in paths:
        adapter = load_lora_adapter(path, source.config, 0, source.identity.num_blocks, dtype, torch.device("cpu"))
        if adapter.name in names:
            raise ValueError(f"--adapters {names[adapter.name]} and {path} are both named {adapter.name!r}: "
                             "adapters are chosen by their directory's name, so rename one")
        names[adapter.name] = path
    return list(names)


class ServerNode:
    """Everything one server process runs on its trio loop."""

    def __init__(self, options: ServeOptions, source: ModelSource, dtype: torch.dtype, device: torch.device,
                 announce: Callable[[str], None], adapter_names: Sequence[str] = ()):
        """``adapter_names``: those of ``options.adapters`` (``check_adapters``)."""
        self.options, self.source, self.dtype, self.device = options, source, dtype, device
        self.announce = announce
        self.adapter_names = list(adapter_names)
        self.identity = source.identity
        self.server: BlockServer | None = None
        self.retired: list[BlockServer] = []  # earlier spans, serving their last sessions
        self.span_start = 0
        self.length = 0
        self.members: SwarmMembership | None = None  # the member list, in a swarm that has one
        self.schedule = RebalanceSchedule(options.rebalance_period)

    def _info(self) -> ServerInfo:
        """What the record says: the server's own info, or the span being loaded before it exists."""
        if self.server is not None and self.server.span.start == self.span_start:
            return self.server.info()
        limits = self.options.limits
        return span_info(self.identity, self.span_start, self.span_start + self.length, self.dtype,
                         self.options.quant, self.source.config.hidden_size, limits.max_length, limits.cache_tokens,
                         self.adapter_names)

    def _how(self) -> str:
        return f"{dtype_name(self.dtype)}, quant {self.options.quant}, {self.device}"

    def shut_down_executors(self) -> None:
        for server in self._all_servers():
            server.executor.shutdown()

    async def run(self, key_pair: KeyPair, length: int, fixed: tuple[int, int] | None) -> None:
        self.length = length
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            plan = address_plan(self.options.listen, self.options.initial_peers, self.options.announce_addrs,
                                peer_id_of(key_pair))
            async with running_host(key_pair, self.options.listen, addresses=plan,
                                    swarm_key=self.options.swarm_key) as host:
                reach = ServerReachability(host, self.options.reachability, self.options.initial_peers,
                                           self.announce, direct_upgrade=self.options.direct_upgrade)
                # A DHT client until found reachable (ServerReachability.running): others must not
                # hand out a server they cannot dial to those who look up the swarm.
                members = SwarmMembership(self.options.swarm_owner) if self.options.swarm_owner else None
                self.members = members
                dht = SwarmDHT(host, key_pair, server_mode=self.options.reachability == "public", members=members)
                self.options.metrics.watch(self.options.metrics.dht_records, dht.stored_records)
                async with dht.running():
                    await self._join(dht)
                    # Joined first, as every server does: the reachability check comes after, so that
                    # servers started together join the swarm as promptly as they did without it.
                    async with reach.running(dht):
                        presence = ServerPresence(dht, self._info, period=self.options.announce_period,
                                                  network_mbps=self.options.network_mbps, addresses=reach.addresses)
                        if fixed is None:
                            await trio.sleep(random.uniform(0.0, 1.0))  # servers started together choose apart
                            self.span_start = choose_start(await self._coverage(dht), length)
                        else:
                            self.span_start = fixed[0]
                        await self._take_span(host, presence)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(presence.keep_fresh)
                            if members is not None:
                                nursery.start_soon(members.keep_fresh, dht, self.options.announce_period,
                                                   functools.partial(self._shut_out, host))
                            if self.options.on_online is not None:
                                nursery.start_soon(self.options.on_online, host, dht)
                            if fixed is None:
                                nursery.start_soon(self._rebalance, dht, host, presence)
                                nursery.start_soon(self._free_retired_spans)
                            async for signum in signals:
                                self.announce(f"received {signal.Signals(signum).name}: shutting down (announcing offline, "
                                              "refusing new sessions)")
                                break
                            nursery.cancel_scope.cancel()  # no more announcements of "online", no more moves
                        await self._drain(presence, signals)

    async def _drain(self, presence: ServerPresence, signals: AsyncIterator[int]) -> None:
        """Leave politely: refuse new sessions, say offline, let running sessions go on for the
        grace period, then end them (their clients replay elsewhere) once their steps are done.
        A second signal skips the wait."""
        servers = self._all_servers()
        for server in servers:
            server.draining = True
        with trio.move_on_after(OFFLINE_RECORD_TIMEOUT_S):
            await presence.publish("offline")
        grace = self.options.shutdown_grace

        def live() -> int:
            return sum(server.live_sessions for server in servers)

        async with trio.open_nursery() as nursery:
            async def second_signal() -> None:
                async for signum in signals:
                    self.announce(f"received {signal.Signals(signum).name} again: stopping now")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(second_signal)
            if live():
                self.announce(f"{live()} sessions running: they may go on for up to {grace:.0f} s "
                              "(signal again to stop now)")
            with trio.move_on_after(grace):
                while live():
                    await trio.sleep(0.1)
            if live():
                self.announce(f"grace period over: ending {live()} sessions once their running steps finish; "
                              "their clients continue on other servers")
            for server in servers:
                server.close_sessions()
            with trio.move_on_after(STEPS_FINISH_S):
                while live():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    async def _shut_out(self, host: IHost, peers: set[str]) -> None:
        """Close the connections of peers a new member list removed: their sessions end now."""
        for peer in peers:
            self.announce(f"peer {peer} was removed from the swarm's member list: closing its connections")
            with trio.move_on_after(5.0):
                await host.disconnect(ID.from_base58(peer))

    def _all_servers(self) -> list[BlockServer]:
        return [*self.retired, *([self.server] if self.server else [])]

    async def _join(self, dht: SwarmDHT) -> None:
        if self.options.initial_peers:
            joined = await dht.join(self.options.initial_peers)
            self.announce(f"joined the swarm through {joined} of {len(self.options.initial_peers)} initial peers")
        else:
            self.announce("started a new swarm: other nodes join it with --initial-peers and this server's address")

    async def _swarm_records(self, dht: SwarmDHT, thorough: bool = True) -> list[ServerAnnouncement]:
        """The records of this model's servers.

        ``thorough`` (the choice at join and the first check after it): every block's providers, not the model key alone:
        placement must see each server, and a server missing from the model key's providers (a
        provider record dropped by a receiver's rate limit) would look like a free span; the block
        keys make 30 chances to be seen. Otherwise (every later rebalance check): the model key, then the
        block keys of the blocks no online record covers (``model_announcements``). Reading every
        block key each period costs each server a lookup per block and lists every provider of
        every block from ~20 holders each: 25 MB a minute at 100 servers, 90 MB at 1,000
        (benchmarks/swarm_simulation.py); the model key's read lists each server once per holder.
        """
        if thorough:
            keys = [block_key(self.identity.model_id, b) for b in range(self.identity.num_blocks)]
            records = await dht.announcements(keys)
        else:
            records = await dht.model_announcements(self.identity.model_id, self.identity.num_blocks)
        return [r for r in records if r.fingerprint == self.identity.fingerprint]

    async def _coverage(self, dht: SwarmDHT) -> list[float]:
        records = await self._swarm_records(dht)
        return block_coverage(records, self.identity.num_blocks, exclude_peer=dht.peer_id)

    async def _take_span(self, host: IHost, presence: ServerPresence) -> None:
        """Claim ``span_start`` (joining), load and serve it, then say it is routable (online)."""
        await presence.publish("joining")
        await self._load(host, presence)
        await presence.publish("online")
        for address in presence.addresses():
            self.announce(f"serving blocks {self.span_start}:{self.span_start + self.length} of "
                          f"{self.identity.model_id} ({self._how()}) at {address}")

    async def _load(self, host: IHost, presence: ServerPresence) -> None:
        """Load blocks [span_start, span_start + length), measure them, and serve them."""
        start, end = self.span_start, self.span_start + self.length
        step = max(1, (end - start) // 5)  # about five progress lines, whatever the span
        loading = f"loading blocks {start}:{end} of {self.identity.model_id}"
        shown = self.options.progress

        def progress(done: int, total: int) -> None:
            if shown is not None:
                shown(loading, done, total)
            elif done % step == 0 or done == total:
                self.announce(f"{loading}: {done}/{total} ({100 * done // total}%)")

        def measuring(text: str, done: int = 0, total: int = 0) -> None:
            if shown is not None and total:
                shown("measuring throughput", done, total)
            elif shown is None and text:
                self.announce(text)

        quant, adapters = self.options.quant, self.options.adapters

        def load() -> BlockSpan:
            span = BlockSpan(self.source, start, end, self.dtype, self.device, progress=progress, quant=quant)
            for path in adapters:
                span.load_adapter(path)
            return span

        span = await trio.to_thread.run_sync(load)
        if adapters:
            self.announce(f"adapters: {', '.join(sorted(span.adapters))}")
        # Measured on this span before its executor starts: the figures are what a client will get.
        figures, cached = await trio.to_thread.run_sync(lambda: cached_throughput(
            span, self.identity.fingerprint, quant,
            lambda: measure_throughput(span, self.options.throughput_seconds, measuring)))
        self.announce(f"throughput per block: {figures.inference_rps:.0f} inference steps/s, "
                      f"{figures.forward_tps:.0f} forward tokens/s" + (" (cached)" if cached else ""))
        presence.inference_rps, presence.forward_tps = figures.inference_rps, figures.forward_tps
        # Sessions opened on the previous span keep it (and its executor and KV pool) until they
        # end; new sessions get this one.
        if self.server is not None:
            self.retired.append(self.server)
        self.server = BlockServer(self.identity, span, DeviceExecutor(span), self.options.limits, self.options.metrics,
                                  self.options.faults)
        self.server.register(host, self.members)

    async def _free_retired_spans(self) -> None:
        """Shut down a moved-from span's executor (freeing its weights and KV pool) once its
        last session has ended; sessions end on close, error or the idle timeout."""
        while True:
            await trio.sleep(1.0)
            for server in [s for s in self.retired if s.pool.free_tokens == s.pool.capacity_tokens]:
                self.retired.remove(server)
                await trio.to_thread.run_sync(server.executor.shutdown)
                log.info("freed blocks %d:%d", server.span.start, server.span.end)

    async def _rebalance(self, dht: SwarmDHT, host: IHost, presence: ServerPresence) -> None:
        wait = self.schedule.first_wait()
        first = True  # servers started together may have chosen alike: the first look reads every block key
        while True:
            await trio.sleep(wait)
            wait = self.schedule.next_wait()
            if not self.schedule.may_move(trio.current_time()):
                continue
            try:
                records = await self._swarm_records(dht, thorough=first)
                first = False
            except Exception as exc:
                log.warning("could not read the swarm to rebalance: %s", exc)
                continue
            me = presence.record()
            target = better_start(records, me, presence.inference_rps)
            if target is None:
                continue
            old = f"{self.span_start}:{self.span_start + self.length}"
            self.announce(f"rebalancing: moving from blocks {old} to {target}:{target + self.length}, "
                          "where the swarm is weaker")
            self.span_start = target
            self.schedule.moved(trio.current_time())
            await self._take_span(host, presence)
