"""The Python API: a model whose blocks live on remote servers and whose head lives here.

    model = DistributedModel(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/12D3Koo..."])  # via the DHT
    model = DistributedModel(peers=[...])                  # or exactly these servers, no DHT
    ids = model.tokenizer("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=20)           # transformers-style
    states = model.hidden_states(ids, blocks=[4, 9])       # after any block
    h = model.run_blocks(states[4], 5, 10)                 # any slice, on your tensors
    h = model.remote_blocks(embeddings, deep_prompts)      # differentiable: train client-side parameters

``DistributedModel(..., adapter="name")`` runs every block with that LoRA adapter, on servers that hold it.
Settings (``wire``, ``step_timeout``, ``adapter``, ``push``, ...): ``ClientOptions``' fields, by name or as ``options=``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import trio

from petald.kernels.client_head import ClientHead
from petald.kernels.deep_prompts import check_deep_prompts
from petald.kernels.quant_choice import resolved_head_quant
from petald.kernels.sampling import end_of_sequence_ids, sample_next
from petald.kernels.sources.model_source import ModelSource
from petald.kernels.sources.open_source import open_source
from petald.p2pnode.client import request_checks
from petald.p2pnode.client.client_options import ClientOptions
from petald.p2pnode.client.failover import Recovery, never_succeeds
from petald.p2pnode.client.inference_session import InferenceSession, token_chunks
from petald.p2pnode.client.link_bandwidth import LinkBandwidths
from petald.p2pnode.client.node_thread import NodeThread
from petald.p2pnode.client.remote_autograd import RemoteBlocksFunction
from petald.p2pnode.client.remote_span import timed_info
from petald.p2pnode.client.request_checks import check_blocks, check_hidden, check_length
from petald.p2pnode.client.speculation import Drafter, SpeculationStats, speculate_through
from petald.p2pnode.client.training_pipeline import TrainingPipeline
from petald.p2pnode.routing.bans import ServerBans
from petald.p2pnode.routing.route import (
    NoRouteError,
    RemoteServer,
    SessionTooLarge,
    SpanRoute,
    format_block_ranges,
    never_admitted,
    unroutable,
)
from petald.p2pnode.transport.address_dialer import UnansweredAddresses, connect_first_answering
from petald.p2pnode.transport.direct_upgrade import client_listen
from petald.p2pnode.transport.first_failure import open_first_failure_nursery
from petald.p2pnode.transport.host import parse_peer_address
from petald.p2pnode.transport.identity import load_or_create_identity
from petald.p2pnode.transport.node_metrics import NodeMetrics
from petald.p2pnode.transport.peer_streams import ServerUnavailable
from petald.p2pnode.transport.private_network import describe_connect_failure
from petald.protocol.announcement import ServerAnnouncement
from petald.protocol.limits import WIRE_VERSION

log = logging.getLogger(__name__)

RETRY_PERIOD_S = 1.0  # between looks at the swarm while blocks are uncovered

# ClientOptions' fields: once attributes of the model itself (``model.step_timeout``), still read there.
_SETTINGS = frozenset(field.name for field in dataclasses.fields(ClientOptions))


class ModelMismatchError(Exception):
    """The servers given hold other weights than the client's model."""


class DistributedModel:
    """Give ``initial_peers`` (any nodes of a swarm: servers are found in the DHT) or ``peers``
    (exactly the servers to use, no DHT)."""

    def __init__(self, peers: Sequence[str] = (), model: str | ModelSource | None = None, *,
                 initial_peers: Sequence[str] = (), options: ClientOptions | None = None,
                 metrics: NodeMetrics | None = None, progress: Callable[[str], None] | None = None,
                 **settings: Any):
        """``settings`` are ``ClientOptions`` fields by name (``wire="int8"``, ``push=False``,
        ...), applied over ``options`` (default: ``ClientOptions()``); an unknown name is a TypeError.
        ``step_timeout`` bounds each server's answer (a hung server is replaced after it);
        ``recovery_timeout`` bounds the wait for a server to take over blocks nobody serves.
        ``model.options`` may be replaced later for the timeouts, the wire, the adapter and pushes
        (read at each use); ``head_quant`` and ``connect_timeout`` take effect here only.
        ``metrics``: the node's, which this client counts into (None: its own, ``model.metrics``);
        ``progress(text)`` hears what it does while a person waits (None: logged at INFO)."""
        self.metrics = metrics or NodeMetrics()
        self._say = progress or (lambda text: log.info("%s", text))
        self.options = dataclasses.replace(options or ClientOptions(), **settings)
        if not peers and not initial_peers:
            raise ValueError("give initial_peers (any node of the swarm) or peers (the servers to use)")
        self.source = open_source(model) if model is None or isinstance(model, str) else model
        self.identity = self.source.identity
        self.config = self.source.config
        self.head = ClientHead(self.source, quant=resolved_head_quant(self.source, self.options.head_quant, self._say))
        self.initial_peers, self.peers = list(initial_peers), list(peers)
        self.bans = ServerBans()  # shared by every session of this client
        self.bandwidths = LinkBandwidths()  # each server's link as measured: sessions opened later choose by it
        self.unanswered = UnansweredAddresses()  # announced addresses not dialled again for a while
        self.recoveries: list[Recovery] = []  # every server replaced in this client's sessions so far
        self.last_route: SpanRoute | None = None  # the route of the last inference session as it ended
        self.last_speculation: SpeculationStats | None = None  # what the last generate(speculate=K) did
        self._tokenizer: Any = None
        upgrade, o = self.options.direct_upgrade, self.options
        list(map(parse_peer_address, peers))  # a bad address is refused before anything is said or dialled
        self._say(f"joining the swarm through {len(initial_peers)} initial peer(s)" if initial_peers else f"connecting to {len(peers)} server(s)")
        self.node = NodeThread(load_or_create_identity(o.identity_file), client_listen([*initial_peers, *peers], upgrade),
                               with_dht=bool(initial_peers), direct_upgrade=upgrade, swarm_key=o.swarm_key,
                               swarm_owner=o.swarm_owner)
        try:
            find = self._discover if initial_peers else self._connect_all
            self.servers = self.node.call(find, list(initial_peers or peers), self.options.connect_timeout)
        except BaseException:
            self.node.stop()
            raise

    def __getattr__(self, name: str) -> Any:
        if name in _SETTINGS and "options" in self.__dict__:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting ``model.step_timeout`` would change nothing (sessions read ``options``): refused.
        if name in _SETTINGS:
            raise AttributeError(f"{name} is a client setting: pass it to DistributedModel(..., {name}=...) "
                                 "or replace model.options")
        super().__setattr__(name, value)

    async def _discover(self, initial_peers: list[str], timeout: float) -> list[RemoteServer]:
        """Join the swarm and find this model's servers; while blocks are uncovered (servers
        still joining or moving), look again until ``timeout``."""
        assert self.node.dht is not None
        await self.node.dht.join(initial_peers, timeout, refresh=False)  # it only looks up its model's servers
        deadline = trio.current_time() + timeout
        while True:
            servers = await self._find_servers()
            covered = {b for s in servers for b in range(s.info.start, s.info.end)}
            if len(covered) == self.identity.num_blocks:
                return servers
            if trio.current_time() + RETRY_PERIOD_S > deadline:
                if not servers:
                    raise ServerUnavailable(f"no server in the swarm answers for {self.identity.model_id}; "
                                            "check --model, or start servers for it")
                return servers  # routing names the uncovered blocks
            await trio.sleep(RETRY_PERIOD_S)

    async def _find_servers(self) -> list[RemoteServer]:
        """This model's online servers from the DHT, each with a measured round trip."""
        dht, timeout = self.node.dht, self.options.connect_timeout
        assert dht is not None
        # Banned servers are not even asked: a hung one would hold up the whole look for its timeout.
        records = [r for r in await dht.model_announcements(self.identity.model_id, self.identity.num_blocks)
                   if r.state == "online" and r.fingerprint == self.identity.fingerprint and r.addresses
                   and not self.bans.is_banned(r.peer_id)]
        found: list[RemoteServer] = []

        async def measure(record: ServerAnnouncement) -> None:
            try:
                with trio.fail_after(timeout):
                    # Connect first, so that the timed round trip does not include the handshake.
                    address = await connect_first_answering(self.node.host, record.peer_id, record.addresses,
                                                            self.unanswered)
                info, rtt = await timed_info(self.node.host, record.peer_id, timeout)
            except Exception as exc:  # an unreachable server is skipped, like a dead one
                if never_succeeds(exc):
                    raise  # not on the swarm's member list: every member server says the same
                log.info("skipping %s: %s", record.peer_id, exc)
                return
            if info.fingerprint == self.identity.fingerprint and info.wire_version == WIRE_VERSION:
                found.append(RemoteServer(record.peer_id, address, info, rtt, record.inference_rps,
                                          record.forward_tps, record.network_mbps))

        async with open_first_failure_nursery() as nursery:
            for record in records:
                nursery.start_soon(measure, record)
        return sorted(found, key=lambda s: s.peer_id)

    async def _connect_all(self, peers: list[str], timeout: float) -> list[RemoteServer]:
        host = self.node.host
        reachable: dict[str, RemoteServer] = {}
        failures: list[str] = []

        parsed = {address: parse_peer_address(address) for address in peers}  # bad addresses fail here

        async def connect(address: str) -> None:
            info = parsed[address]
            try:
                with trio.fail_after(timeout):
                    await host.connect(info)
                server_info, _ = await timed_info(host, info.peer_id.to_base58(), timeout)
                if server_info.wire_version != WIRE_VERSION:
                    raise ServerUnavailable(f"it speaks wire version {server_info.wire_version}, "
                                            f"this client {WIRE_VERSION}: upgrade the older one")
            except Exception as exc:  # any failure only skips this peer; the reason is reported
                failures.append(f"{address}: {describe_connect_failure(host, exc)}")
                return
            reachable[address] = RemoteServer(info.peer_id.to_base58(), address, server_info)

        async with trio.open_nursery() as nursery:
            for address in peers:
                nursery.start_soon(connect, address)
        for address in failures:
            log.warning("skipping peer %s", address)
        servers = [reachable[a] for a in peers if a in reachable]
        mismatched = [s for s in servers if s.info.fingerprint != self.identity.fingerprint]
        if mismatched and len(mismatched) == len(servers):
            s = mismatched[0]
            raise ModelMismatchError(
                f"the servers hold {s.info.model_id}, but this client loaded {self.identity.model_id}: "
                "the weights differ (fingerprints do not match); pass the same --model to both")
        for s in mismatched:
            log.warning("ignoring %s: it serves %s, not %s", s.address, s.info.model_id, self.identity.model_id)
        good = [s for s in servers if s not in mismatched]
        if not good:
            raise ServerUnavailable("no usable server among the peers given:\n  " + "\n  ".join(failures))
        return good

    # --- sessions ------------------------------------------------------------------------------

    def route(self, start: int = 0, end: int | None = None, split_after: Sequence[int] = (),
              cache_tokens_per_block: int = 0, max_length: int = 0) -> SpanRoute:
        """The quickest chain of servers over blocks [start, end) admitting sessions of ``max_length``
        tokens; waits up to ``recovery_timeout`` for blocks nobody serves, then raises NoRouteError
        naming them (SessionTooLarge at once when the servers there can never admit such a session)."""
        end = self.identity.num_blocks if end is None else end
        check_blocks(self.identity, start, end)

        async def within_timeout() -> SpanRoute:
            deadline = trio.current_time() + self.options.recovery_timeout
            return await self._find_route(start, end, deadline, cache_tokens_per_block, frozenset(split_after),
                                          max_length=max_length)

        return self.node.call(within_timeout)

    async def _find_route(self, start: int, end: int, deadline: float, cache_tokens_per_block: int = 0,
                          split_after: frozenset[int] = frozenset(), tokens: int = 0,
                          busy: dict[str, float] | None = None, max_length: int = 0) -> SpanRoute:
        """A route over servers that are not banned; while there is none, look at the swarm again
        (servers join, leave and move) every second until ``deadline``. A session the servers of
        some blocks can never admit is refused at once (SessionTooLarge), not waited for."""
        # What the client knew before it last looked may be dead: a server that failed comes back
        # only once a fresh look at the swarm finds it alive.
        self.servers = [s for s in self.servers if not self.bans.has_failed(s.peer_id)]
        looked = waiting = False
        adapter = self.options.adapter
        while True:
            usable = [s for s in self.servers if not self.bans.is_banned(s.peer_id)
                      and (not adapter or adapter in s.info.adapters)]
            try:
                return SpanRoute.plan(usable, start, end, split_after, cache_tokens_per_block, tokens, busy,
                                      max_length)
            except NoRouteError as exc:
                missing = exc
            # Banned servers count here: one banned for now may admit the session once its ban ends.
            never = never_admitted([s for s in self.servers if not adapter or adapter in s.info.adapters],
                                   missing.uncovered, max_length, cache_tokens_per_block)
            if never:
                raise SessionTooLarge(f"blocks {format_block_ranges(missing.uncovered)} of "
                                      f"{self.identity.model_id}: {never}", missing.uncovered)
            if trio.current_time() >= deadline:
                waited = (f"waited {self.options.recovery_timeout:.0f} s for a server" if looked
                          else "no time left to wait")
                holding = f" holding adapter {adapter!r}" if adapter else ""
                raise unroutable(usable, missing.uncovered, self.identity.model_id, max_length, cache_tokens_per_block,
                                 holding, waited) from None
            if looked:
                if not waiting:  # once per wait: a person at a terminal sees why nothing happens yet
                    waiting = True
                    self._say(f"waiting for a server for blocks {format_block_ranges(missing.uncovered)} of "
                              f"{self.identity.model_id} (up to {deadline - trio.current_time():.0f} s)")
                await trio.sleep(max(0.0, min(RETRY_PERIOD_S, deadline - trio.current_time())))
            with trio.move_on_after(max(0.1, deadline - trio.current_time())):
                self.servers = await self._refresh_servers()
            looked = True

    async def _refresh_servers(self) -> list[RemoteServer]:
        """Who serves this model now: from the DHT, or the peers given, whichever this client uses."""
        if self.initial_peers:
            return await self._find_servers()
        peers = [p for p in self.peers if not self.bans.is_banned(parse_peer_address(p).peer_id.to_base58())]
        try:
            return await self._connect_all(peers, self.options.connect_timeout)
        except ServerUnavailable:
            return []  # none answers yet; the caller looks again until its deadline

    @contextlib.contextmanager
    def inference_session(self, batch: int = 1, max_length: int = 2048, route: SpanRoute | None = None,
                          deep_prompts: torch.Tensor | None = None) -> Iterator[InferenceSession]:
        """A session whose servers are replaced (with a replay of its history) when they fail.

        ``deep_prompts`` [model blocks, 1 or batch, P, hidden] are added to positions [0, P) before each block."""
        check_length(self.identity, self.config, max_length, "the session's max_length")
        cache_tokens = batch * max_length
        route = route or self.route(cache_tokens_per_block=cache_tokens, max_length=max_length)

        async def find_route(start: int, end: int, deadline: float) -> SpanRoute:
            return await self._find_route(start, end, deadline, cache_tokens, max_length=max_length)

        session = InferenceSession(self.node.host, route, self.identity, batch, max_length, self.options,
                                   find_route, self.bans, deep_prompts, self.bandwidths)
        try:
            self.node.call(session.open)
            self.metrics.client_sessions.inc()
            yield session
        finally:
            self.node.call(session.close)
            self.last_route = SpanRoute(tuple(link.hop for link in session.links))
            self.recoveries.extend(session.recoveries)
            self.metrics.failovers.inc(len(session.recoveries))
            self.metrics.count_wire(session.bytes_received, session.bytes_sent)

    def _step(self, session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
        """Send ``hidden`` through the session in chunks; returns the last hop's output."""
        with self.metrics.client_step_seconds.time():
            outs = [self.node.call(session.step, part) for part in token_chunks(hidden)]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    # --- the API -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.source.load_tokenizer()
        return self._tokenizer

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None, prefix: torch.Tensor | None = None,
                 deep_prompts: torch.Tensor | None = None, speculate: int = 0,
                 drafter: Drafter | None = None) -> torch.LongTensor:
        """Like transformers' generate: returns prompt + new tokens, [batch, length].

        Greedy unless ``do_sample``. Stops when every row has produced an EOS token.
        ``streamer`` is called with each new column of tokens [batch] as it is chosen.
        ``prefix`` [P, hidden] (soft prompt embeddings) goes before the prompt, and ``deep_prompts``
        [model blocks, P, hidden] are added at those positions before each block (``PromptTuning``).
        ``speculate`` K > 0 verifies up to K drafts (``drafter``) per trip, same output (speculation.py).
        """
        input_ids = request_checks.generate_prompt(self.identity, self.config, input_ids, max_new_tokens, top_p,
                                                   speculate, prefix.shape[0] if prefix is not None else 0)
        eos = torch.tensor(end_of_sequence_ids(self.config.eos_token_id if eos_token_id is None else eos_token_id),
                           dtype=torch.long)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool)
        tokens = [input_ids]
        embeds = self.head.embed(input_ids)
        if deep_prompts is not None and (prefix is None or deep_prompts.shape[-2] != prefix.shape[0]):
            raise ValueError("deep_prompts cover the prefix's positions: give a prefix of as many positions "
                             f"as the deep prompts have ({deep_prompts.shape[-2]})")
        if prefix is not None:
            embeds = torch.cat([prefix.to(embeds.dtype)[None].expand(batch, -1, -1), embeds], dim=1)
        deep = deep_prompts[:, None] if deep_prompts is not None else None
        with self.inference_session(batch, embeds.shape[1] + max_new_tokens, deep_prompts=deep) as session:
            hidden = self._step(session, embeds)
            if speculate:
                return speculate_through(self, session, input_ids, hidden, max_new_tokens, eos.tolist(), speculate,
                                         drafter, temperature if do_sample else 0.0, top_p, generator, streamer)
            for _ in range(max_new_tokens):
                logits = self.head.logits(hidden[:, -1])
                nxt = sample_next(logits, temperature if do_sample else 0.0, top_p, generator)
                nxt = torch.where(finished, torch.as_tensor(self.config.pad_token_id or 0), nxt)
                tokens.append(nxt[:, None])
                self.metrics.tokens_generated.inc(int((~finished).sum()))
                if streamer is not None:
                    streamer(nxt)
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()) or len(tokens) - 1 == max_new_tokens:
                    break
                hidden = self._step(session, self.head.embed(nxt[:, None]))
        return torch.cat(tokens, dim=1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for ``input_ids``."""
        input_ids = torch.as_tensor(input_ids)
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        with self.inference_session(input_ids.shape[0], input_ids.shape[1]) as session:
            return self.head.logits(self._step(session, self.head.embed(input_ids)))

    def hidden_states(self, input_ids: torch.Tensor, blocks: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """The hidden state after each block in ``blocks`` (default: every block), by block index.

        The route is cut after each block asked for, so each state is what a server returned.
        """
        input_ids = torch.as_tensor(input_ids)
        n = self.identity.num_blocks
        wanted = sorted(set(range(n) if blocks is None else blocks))
        if not wanted or any(not 0 <= b < n for b in wanted):
            raise ValueError(f"blocks must be a non-empty list of block indices in [0, {n})")
        route = self.route(0, wanted[-1] + 1, split_after=wanted)
        states: dict[int, torch.Tensor] = {}
        with self.inference_session(input_ids.shape[0], input_ids.shape[1], route) as session:
            parts = [self.node.call(session.step_states, part) for part in token_chunks(self.head.embed(input_ids))]
        for hop in route.hops:
            states[hop.end - 1] = torch.cat([part[hop.end] for part in parts], dim=1)
        return {b: states[b] for b in wanted}

    def run_blocks(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run blocks [start, end) on caller-supplied hidden states [batch, tokens, hidden] at positions 0..T-1."""
        check_blocks(self.identity, start, end)
        check_hidden(self.config, hidden)
        batch, length = hidden.shape[0], hidden.shape[1]
        check_length(self.identity, self.config, length, "hidden's positions")
        route = self.route(start, end, cache_tokens_per_block=batch * length, max_length=length)
        with self.inference_session(batch, length, route) as session:
            return self._step(session, hidden)

    # --- training ------------------------------------------------------------------------------

    def remote_blocks(self, hidden: torch.Tensor, deep_prompts: torch.Tensor | None = None, start: int = 0,
                      end: int | None = None) -> torch.Tensor:
        """Blocks [start, end) over whole sequences ``hidden`` [batch, tokens, hidden] (positions 0..T-1),
        differentiable: gradients reach ``hidden`` and ``deep_prompts`` (servers send them back; their
        weights stay frozen).

        ``deep_prompts`` [end - start, 1 or batch, prompt tokens, hidden] is added to the first positions
        of the hidden states before each block (deep prompt tuning). The batch is cut into chunks of at
        most ``options.max_chunk_tokens`` tokens that run in parallel, routed for throughput; a server that fails
        is replaced and the chunk carries on from the blocks it held.
        """
        end = self.identity.num_blocks if end is None else end
        check_blocks(self.identity, start, end)
        check_hidden(self.config, hidden)
        if deep_prompts is not None:
            check_deep_prompts(deep_prompts, end - start, hidden.shape[0], hidden.shape[2], hidden.shape[1],
                               name="deep_prompts")
        return RemoteBlocksFunction.apply(hidden, deep_prompts, self.node, self._training_pipeline(), start, end)

    def _training_pipeline(self) -> TrainingPipeline:
        async def find_route(start: int, end: int, deadline: float, tokens: int, busy: dict[str, float]
                             ) -> SpanRoute:
            return await self._find_route(start, end, deadline, tokens=tokens, busy=busy)

        # One record of every server replaced, whatever the work.
        return TrainingPipeline(self.node.host, self.identity, find_route, self.bans, self.options, self.recoveries)

    def close(self) -> None:
        self.node.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
