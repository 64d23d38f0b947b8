"""A test-only fault switch: a real server process that answers steps wrongly, so that tests can
check that a client takes every malformed or mismatched reply for that server's failure (ban,
re-route, replay, the same tokens). docs/security.md says why it cannot be turned on by accident.

``PETALD_TEST_FAULT="KIND@STEP[,KIND@STEP...]"``: the server's n-th session takes the n-th entry
(in turn) and, from its STEP-th step on (1 is the first), answers each step with the fault KIND
instead of its output (``FAULT_KINDS``).

It is honoured only together with ``PETALD_TESTING=1`` and on a server that can be reached from
this machine alone (it listens on, is joined through and announces loopback addresses only);
anything else makes ``petald serve`` refuse to start, with a sentence: a fault asked for is never
silently ignored, and never served to another machine.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from petald.p2pnode.transport.announced_addresses import is_loopback_swarm
from petald.protocol.framing import encode_frame
from petald.protocol.limits import FRAME_HEADER_BYTES, MAX_TENSOR_BYTES
from petald.protocol.tensors import encode_tensor

FAULT_VARIABLE = "PETALD_TEST_FAULT"
TESTING_VARIABLE = "PETALD_TESTING"

# What each fault puts in place of the step's output.
FAULT_KINDS = {
    # Within every per-dimension limit, empty, and torch's strides of it overflow (issue 22, hole 0).
    "empty_4d": "a tensor of shape [0, 24Mi, 24Mi, 24Mi]",
    "bfloat16": "zeros in bfloat16, whatever the session's wire format",
    "short": "the output without its last token",
    "garbage": "a frame that is not msgpack",
    "nan": "the output with a NaN in it",
}


def _faulty_hidden(kind: str, hidden: torch.Tensor) -> dict:
    if kind == "empty_4d":
        return {"dtype": "float32", "shape": [0, MAX_TENSOR_BYTES, MAX_TENSOR_BYTES, MAX_TENSOR_BYTES],
                "codec": "raw", "data": b""}
    if kind == "bfloat16":
        return encode_tensor(torch.zeros_like(hidden), "bfloat16")
    if kind == "short":
        return encode_tensor(hidden[:, :-1], "float32")
    broken = hidden.clone()
    broken.view(-1)[0] = float("nan")
    return encode_tensor(broken, "float32")


@dataclass
class SessionFault:
    """One session's fault: ``kind`` from its step ``from_step`` on."""

    kind: str
    from_step: int
    steps: int = 0

    def frame(self, output: dict, hidden: torch.Tensor) -> bytes | None:
        """The frame to send in place of the step output ``output`` (of ``hidden``), or None: send it."""
        self.steps += 1
        if self.steps < self.from_step:
            return None
        if self.kind == "garbage":
            body = b"\xc1 not msgpack"  # 0xc1 is the one byte msgpack never uses
            return len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body
        return encode_frame({**output, "hidden": _faulty_hidden(self.kind, hidden)})


class FaultSwitch:
    def __init__(self, plan: Sequence[tuple[str, int]]):
        self.plan = list(plan)
        self._turns = itertools.cycle(self.plan)

    def describe(self) -> str:
        return ", ".join(f"{FAULT_KINDS[kind]} from step {step}" for kind, step in self.plan)

    def for_session(self) -> SessionFault:
        kind, step = next(self._turns)
        return SessionFault(kind, step)

    @classmethod
    def from_environment(cls, listen: Sequence[str], initial_peers: Sequence[str], announce: Sequence[str],
                         environ: Mapping[str, str] = os.environ) -> FaultSwitch | None:
        """The switch ``environ`` asks for (None: none), or ValueError when it may not be honoured here."""
        text = environ.get(FAULT_VARIABLE, "")
        if not text:
            return None
        if environ.get(TESTING_VARIABLE) != "1":
            raise ValueError(f"{FAULT_VARIABLE} makes this server answer wrongly on purpose and is for petald's "
                             f"tests only (with {TESTING_VARIABLE}=1); unset it to serve")
        if not all(is_loopback_swarm([address], ()) for address in [*listen, *initial_peers, *announce]):
            raise ValueError(f"{FAULT_VARIABLE} is honoured only on a server reachable from this machine alone: "
                             "listen on, join through and announce loopback addresses only")
        plan = []
        for entry in text.split(","):
            kind, _, step = entry.strip().partition("@")
            if kind not in FAULT_KINDS or not step.isdigit() or int(step) < 1:
                raise ValueError(f"{FAULT_VARIABLE} entry {entry!r} is not KIND@STEP with KIND one of "
                                 f"{', '.join(FAULT_KINDS)} and STEP >= 1")
            plan.append((kind, int(step)))
        return cls(plan)

