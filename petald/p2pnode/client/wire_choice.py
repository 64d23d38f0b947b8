"""Which wire format each hop of a client's route uses, under ``ClientOptions.wire`` ("auto": the default).

Every hop gets its own choice: each span session the client opens (how the server sends its
outputs, and how the client sends it steps) and each server-to-server push hop (``PushTarget.wire``).
The rule (docs/protocol.md, "Choosing a wire per hop"): 16-bit ("float16", bfloat16 for a tensor
out of float16's range), unless a decode step's 16-bit payload takes a significant share of the
hop's round trip to cross the link: then int8, which halves it. On a fast link the round trip
dominates and int8 would buy almost nothing for its precision; on a slow one the payload's
transfer time is what halving saves. A hop whose bandwidth or round trip is unknown goes 16-bit.

The round trip is what the client measured to the server (its info request). A session's bandwidth
is what the client measured on its link to the server (``link_bandwidth.py``, from earlier sessions'
large steps), else what the server announces (``--network-mbps``). A push hop's is the lower of the
two servers' announced figures: the client sees none of the traffic between them, and its own link
to either may be the slow one. Its round trip the client cannot see either: the receiving server's
round trip from the client stands for it.
"""

from __future__ import annotations

from petald.p2pnode.client.link_bandwidth import LinkBandwidths
from petald.p2pnode.routing.route import RemoteServer

AUTO = "auto"
SIXTEEN_BIT = "float16"  # float16 where a tensor's range allows, bfloat16 otherwise (protocol/tensors.py)
# int8 when a decode step's 16-bit transfer time is at least this share of the hop's round trip:
# halving the payload then saves at least a tenth of the hop's time.
INT8_SHARE_OF_RTT = 0.2


def link_wire(payload_bytes: int, rtt_s: float, mbps: float) -> str:
    """The format for a link: 16-bit, or int8 when ``payload_bytes`` (16-bit) at ``mbps`` takes
    ``INT8_SHARE_OF_RTT`` of ``rtt_s`` or more; 16-bit when either figure is unknown (0)."""
    if rtt_s <= 0 or mbps <= 0:
        return SIXTEEN_BIT
    transfer_s = payload_bytes * 8 / (mbps * 1e6)
    return "int8" if transfer_s >= INT8_SHARE_OF_RTT * rtt_s else SIXTEEN_BIT


def _decode_payload(rows: int, hidden_size: int) -> int:
    return rows * hidden_size * 2  # one token per row, 16 bits per value


def session_wire(choice: str, server: RemoteServer, rows: int, bandwidths: LinkBandwidths | None = None) -> str:
    """The format of a span session on ``server`` (the client's link to it) for ``rows`` sequences;
    ``bandwidths``: the links' measured rates (None: the announced ones alone)."""
    if choice != AUTO:
        return choice
    mbps = bandwidths.mbps(server) if bandwidths is not None else server.network_mbps
    return link_wire(_decode_payload(rows, server.info.hidden_size), server.rtt, mbps)


def push_wire(choice: str, sender: RemoteServer, receiver: RemoteServer, rows: int) -> str:
    """The format of the push hop from ``sender`` to ``receiver``."""
    if choice != AUTO:
        return choice
    known = [s.network_mbps for s in (sender, receiver) if s.network_mbps > 0]
    mbps = min(known) if len(known) == 2 else 0.0
    return link_wire(_decode_payload(rows, receiver.info.hidden_size), receiver.rtt, mbps)


def training_wire(choice: str) -> str:
    """Training requests: under "auto", 16-bit (their gradients were not measured through int8)."""
    return SIXTEEN_BIT if choice == AUTO else choice
