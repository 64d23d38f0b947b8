"""The simulated swarm over time: joins, moves, departures and one regional outage, in events.

Every server runs petald's own decisions: ``choose_start`` when it joins, and on the
``RebalanceSchedule``'s clock ``move_target`` (the rule behind ``better_start``), over the
coverage a DHT read shows it: the live records (joining or online) of every server, and the
records of crashed servers until they expire (a server that leaves with SIGTERM says offline
first). The view is one swarm-wide coverage list kept up to date event by event, equal to
``block_coverage`` over those records (the test checks that). Records appear a publish delay
after a server's decision. A server loads its blocks (while its record says joining), measures,
then says online; only online servers serve (the true coverage).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import numpy as np

from petald.p2pnode.routing.placement import RebalanceSchedule, choose_start, move_target
from petald.p2pnode.swarm.presence import EXPIRY_PERIODS, MIN_EXPIRY_S
from petald.protocol.announcement import ServerAnnouncement

from .geography import Geography
from .population import Hardware, HardwarePool

ANNOUNCE_PERIOD_S = 30.0  # ServeOptions.announce_period
REBALANCE_PERIOD_S = 60.0  # ServeOptions.rebalance_period
JOIN_S = (2.0, 3.0)  # joining the DHT, then server_node's random wait before choosing
PUBLISH_S = 1.0  # from a decision to its record being readable (a DHT put)
MEASURE_S = 1.0  # --throughput-seconds
UNMEASURED_WEIGHT = 1e-3  # block_coverage's weight of a record without throughput yet


@dataclass
class SimServer:
    peer_id: str
    node: int
    hardware: Hardware
    schedule: RebalanceSchedule
    start: int = 0
    alive: bool = True
    online: bool = False  # serving its span (true coverage)
    measured: bool = False
    view_span: tuple[int, float] | None = None  # (start, weight) its readable record adds, None: none
    version: int = 0  # bumped by every move: stale load completions are ignored

    @property
    def length(self) -> int:
        return self.hardware.blocks


@dataclass
class Sample:
    time: float
    alive: int
    weakest: float
    ideal: float
    uncovered: int


@dataclass
class SwarmEvents:
    servers_target: int
    geo: Geography
    pool: HardwarePool
    rng: random.Random
    lifetime_s: float
    formation_s: float
    graceful_share: float = 0.5
    now: float = 0.0
    servers: dict[str, SimServer] = field(default_factory=dict)  # alive
    shown: dict[str, SimServer] = field(default_factory=dict)  # with a readable record (crashed ones too)
    samples: list[Sample] = field(default_factory=list)
    moves: int = 0
    checks: int = 0
    departures: int = 0
    _queue: list = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.num_blocks = self.pool.num_blocks
        self.view = [0.0] * self.num_blocks  # what a DHT read shows (block_coverage of the records)
        self.true = np.zeros(self.num_blocks)  # online servers' throughput per block
        self.expiry_s = max(MIN_EXPIRY_S, EXPIRY_PERIODS * ANNOUNCE_PERIOD_S)
        for _ in range(self.servers_target):
            self.at(self.rng.uniform(0.0, self.formation_s), self.arrive)

    # --- the event queue -----------------------------------------------------------------------
    def at(self, time: float, action, *args) -> None:  # noqa: ANN001
        self._seq += 1
        heapq.heappush(self._queue, (time, self._seq, action, args))

    def run_until(self, time: float) -> None:
        while self._queue and self._queue[0][0] <= time:
            self.now, _, action, args = heapq.heappop(self._queue)
            action(*args)
        self.now = time

    # --- what records show, what servers serve -------------------------------------------------
    def _show(self, server: SimServer, span: tuple[int, float] | None) -> None:
        for sign, shown in ((-1.0, server.view_span), (1.0, span)):
            if shown is not None:
                for block in range(shown[0], shown[0] + server.length):
                    self.view[block] += sign * shown[1]
        server.view_span = span
        if span is None:
            self.shown.pop(server.peer_id, None)
        else:
            self.shown[server.peer_id] = server

    def _serve(self, server: SimServer, online: bool) -> None:
        if server.online != online:
            sign = 1.0 if online else -1.0
            self.true[server.start:server.start + server.length] += sign * server.hardware.inference_rps
            server.online = online

    def _record_weight(self, server: SimServer) -> float:
        return server.hardware.inference_rps if server.measured else UNMEASURED_WEIGHT

    def view_records(self) -> list[ServerAnnouncement]:
        """The records a DHT read returns now (for checking the view against block_coverage)."""
        return [ServerAnnouncement(
            peer_id=s.peer_id, addresses=[], state="online" if s.online else "joining", model_id="sim",
            fingerprint="sim", num_blocks=self.num_blocks, start=s.view_span[0], end=s.view_span[0] + s.length,
            dtype="float16", quant="none", max_length=8192, free_cache_tokens=0,
            inference_rps=s.hardware.inference_rps if s.measured else 0.0, forward_tps=0.0, network_mbps=0.0,
            issued_at=0.0, expires_at=1.0, version="sim") for s in self.shown.values() if s.view_span is not None]

    # --- a server's life -----------------------------------------------------------------------
    def arrive(self) -> None:
        node = int(self.geo.add(1)[0])
        server = SimServer(f"s{node}", node, self.pool.draw(), RebalanceSchedule(REBALANCE_PERIOD_S, self.rng))
        self.servers[server.peer_id] = server
        self.at(self.now + self.rng.uniform(*JOIN_S), self.choose, server)

    def choose(self, server: SimServer) -> None:
        if server.alive:
            self._take(server, choose_start(self.view, server.length))

    def _take(self, server: SimServer, start: int) -> None:
        """Claim ``start`` (joining), load, measure, then serve (server_node's _take_span)."""
        self._serve(server, False)
        server.start, server.version = start, server.version + 1
        self.at(self.now + PUBLISH_S, self._publish, server, server.version)
        loaded = self.now + PUBLISH_S + server.length * server.hardware.load_s_per_block + MEASURE_S
        self.at(loaded, self._online, server, server.version)

    def _publish(self, server: SimServer, version: int) -> None:
        if server.alive and server.version == version:
            self._show(server, (server.start, self._record_weight(server)))

    def _online(self, server: SimServer, version: int) -> None:
        if not server.alive or server.version != version:
            return
        server.measured = True
        self._show(server, (server.start, self._record_weight(server)))
        self._serve(server, True)
        wait = server.schedule.first_wait() if self.moves_of(server) == 0 else server.schedule.next_wait()
        self.at(self.now + wait, self.check, server)

    def moves_of(self, server: SimServer) -> int:
        return server.version - 1

    def check(self, server: SimServer) -> None:
        if not server.alive:
            return
        if not server.schedule.may_move(self.now):
            self.at(self.now + server.schedule.next_wait(), self.check, server)
            return
        self.checks += 1
        own = server.view_span
        others = list(self.view)
        if own is not None:
            for block in range(own[0], own[0] + server.length):
                others[block] -= own[1]
        target = move_target(others, server.start, server.length, server.hardware.inference_rps)
        if target is None:
            self.at(self.now + server.schedule.next_wait(), self.check, server)
            return
        self.moves += 1
        server.schedule.moved(self.now)
        self._take(server, target)  # its next check follows the load

    def leave(self, server: SimServer, graceful: bool) -> None:
        """SIGTERM: says offline at once. A crash: its record stays until it expires (it was last
        republished up to one announce period ago)."""
        server.alive = False
        self.departures += 1
        self._serve(server, False)
        if graceful:
            self._show(server, None)
        else:
            self.at(self.now + self.expiry_s - self.rng.uniform(0.0, ANNOUNCE_PERIOD_S), self._show, server, None)
        del self.servers[server.peer_id]

    def churn(self, start: float, until: float) -> None:
        """Poisson departures (mean lifetime ``lifetime_s``) and as many Poisson joins, from ``start``
        until ``until``."""
        rate = self.servers_target / self.lifetime_s
        for action in (self._random_departure, self.arrive):
            time = start + self.rng.expovariate(rate)
            while time < until:
                self.at(time, action)
                time += self.rng.expovariate(rate)

    def _random_departure(self) -> None:
        if self.servers:
            server = self.rng.choice(list(self.servers.values()))
            self.leave(server, self.rng.random() < self.graceful_share)

    def outage(self, share: float, kind: str = "blocks") -> int:
        """The ``share`` of servers crash together: ``region``, those nearest one of them (a regional
        outage: their spans are spread over the model); ``blocks``, those whose spans lie nearest one
        block (one provider's fleet that had joined together): every holder of that block and its
        neighbours, so that some blocks lose every server."""
        alive = list(self.servers.values())
        count = int(round(share * len(alive)))
        if kind == "region":
            nodes = np.array([s.node for s in alive])
            centre = int(self.rng.choice(nodes))
            victims = set(self.geo.nearest(centre, count, nodes).tolist())
            doomed = [s for s in alive if s.node in victims]
        else:
            block = self.rng.randrange(self.num_blocks)

            def distance(server: SimServer) -> int:
                return max(server.start - block, block - (server.start + server.length - 1), 0)
            doomed = sorted(alive, key=lambda s: (distance(s), self.rng.random()))[:count]
        for server in doomed:
            self.leave(server, graceful=False)
        return len(doomed)

    # --- measurements --------------------------------------------------------------------------
    def ideal(self) -> float:
        """An upper bound of the weakest block: every live server's throughput over its blocks,
        spread evenly over all blocks (no placement does better)."""
        return sum(s.hardware.inference_rps * s.length for s in self.servers.values()) / self.num_blocks

    def sample(self) -> Sample:
        sample = Sample(self.now, len(self.servers), float(self.true.min()), self.ideal(),
                        int((self.true <= 0).sum()))
        self.samples.append(sample)
        return sample
