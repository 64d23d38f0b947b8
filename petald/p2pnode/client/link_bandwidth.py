"""The bandwidth of the client's link to each server, measured passively from the steps it sends.

No probe traffic: a step big enough to tell (a prefill, a replay) moves its bytes both ways, and
its answer comes after one round trip, the server's hold of it (``StepOutput.held_ms``: from the
step received to its answer ready) and the transfer of those bytes. What is left once the round
trip and the hold are taken off is the transfer; bytes over it is the link's rate. Each server keeps
the median of its last few such samples, which ``wire_choice`` prefers to the server's announced
figure (docs/protocol.md, "Choosing a wire per hop").
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque

from petald.p2pnode.routing.route import RemoteServer

# A step moving fewer bytes (both ways, frames included) gives no sample: a decode step's few
# kilobytes cross any link in well under the noise of a step's timing (scheduling, encoding, a
# garbage collection), so one stalled decode step would read as a slow link.
MIN_SAMPLE_BYTES = 32 * 1024
# The transfer must take at least this many round trips (as the client measured them) to count.
# The measured round trip (``RemoteServer.rtt``, from the info request) is up to two real ones, so
# taking it off may take off one round trip too many: with the transfer at least one measured
# (two real) round trips, the reading is at most a third short, the rate at most 1.5x high. High,
# not low: an error leans to the 16-bit wire, never to int8 on a fast link.
MIN_TRANSFER_RTTS = 1.0
# ... and at least this long: below it, timer and event-loop jitter (a millisecond or two) is a
# large share of the reading, whatever the round trip (near zero on a local network).
MIN_TRANSFER_S = 0.010
# Samples kept per server (the newest): the median of a few shrugs off one outlier and follows a
# link that changes, without remembering it for long.
SAMPLES_PER_SERVER = 5
# Servers remembered (the most recently measured): a client's memory stays bounded in a large swarm.
MAX_SERVERS = 256


def bandwidth_sample(bytes_moved: int, elapsed_s: float, rtt_s: float, held_s: float | None) -> float | None:
    """The link's rate in Mbit/s from one step: ``bytes_moved`` both ways, ``elapsed_s`` from sending
    it to its answer, the hop's measured ``rtt_s`` and the server's ``held_s``. None when the
    transfer's share of the step is too small to tell (the thresholds above), or a figure is unknown."""
    if held_s is None or rtt_s <= 0 or bytes_moved < MIN_SAMPLE_BYTES:
        return None
    transfer_s = elapsed_s - rtt_s - held_s
    if transfer_s < max(MIN_TRANSFER_S, MIN_TRANSFER_RTTS * rtt_s):
        return None
    return bytes_moved * 8 / transfer_s / 1e6


class LinkBandwidths:
    """Each server's measured link rate (Mbit/s): the median of its last ``SAMPLES_PER_SERVER`` samples."""

    def __init__(self) -> None:
        self._samples: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many servers' links are remembered."""
        return len(self._samples)

    def record(self, peer_id: str, mbps: float | None) -> None:
        """Add a sample for ``peer_id`` (None, from ``bandwidth_sample``: nothing to add)."""
        if mbps is None:
            return
        samples = self._samples.pop(peer_id, None) or deque(maxlen=SAMPLES_PER_SERVER)
        samples.append(mbps)
        self._samples[peer_id] = samples  # the most recently measured last
        while len(self._samples) > MAX_SERVERS:
            self._samples.popitem(last=False)

    def measured(self, peer_id: str) -> float:
        """The server's measured rate; 0 when none was measured."""
        samples = self._samples.get(peer_id)
        return statistics.median(samples) if samples else 0.0

    def mbps(self, server: RemoteServer) -> float:
        """The rate to choose a wire by: measured where it was, else announced (0: unknown)."""
        return self.measured(server.peer_id) or server.network_mbps
