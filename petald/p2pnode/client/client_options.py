"""A client's settings, with their defaults written once: what ``DistributedModel(**settings)``
accepts and what its sessions and training pipelines read.

    DistributedModel(peers, wire="float32", step_timeout=10)      # settings by name
    DistributedModel(peers, options=ClientOptions(wire="int8"))   # or as one object
"""

from __future__ import annotations

from dataclasses import dataclass

from petald.p2pnode.transport.swarm_key import SwarmKey
from petald.vocabulary import WIRE_CHOICES


@dataclass(frozen=True)
class ClientOptions:
    # How hidden states travel (vocabulary.WIRE_CHOICES): "auto" picks 16-bit or int8 per hop
    # (client/wire_choice.py); "float32" is the exact reference.
    wire: str = "auto"
    # Timeouts (docs/fault_tolerance.md, "Timeouts at internet distances", says how each holds at
    # 100 ms round trips and a 10 Mbit/s uplink).
    # For each server's answer: a hung server is replaced after it. A decode step at 100 ms round
    # trips answers in well under a second; a large step also gets its transfer time over the
    # slowest link allowed for (limits.SLOWEST_LINK_BYTES_PER_S).
    step_timeout: float = 30.0
    # To reach a server or join the swarm: dials (10 s per address), DHT lookups (10 s each) and
    # the info round trip; at 100 ms round trips a client's start takes ~2 s of it.
    connect_timeout: float = 15.0
    # To wait for a server to take over blocks nobody serves: a server's start (load, measure,
    # announce) takes ~10-30 s.
    recovery_timeout: float = 60.0
    # A LoRA adapter's name: only servers holding it are used, and they apply it ("": the base model).
    adapter: str = ""
    max_chunk_tokens: int = 1024  # the tokens of one training request (``remote_blocks``)
    # The local LM head, stored as ``ClientHead`` does (vocabulary.HEAD_QUANT_MODES): "bf16" is the fast choice
    # on CPUs with native bfloat16; "none" (float32) is the reference.
    head_quant: str = "none"
    # Servers pass each inference step's output on to the next server themselves (docs/protocol.md,
    # "Pushing steps"); False: every hop goes through this client.
    push: bool = True
    # A pushed step whose answer is this late (or 4x the hop's last step, if longer; plus two
    # transfers of the step over the slowest link allowed for) is sent by the client too: the push
    # may have been lost between the servers. A pushed decode step at 100 ms round trips answers
    # ~50 ms + compute after the hop before it.
    push_grace: float = 1.0
    # Relayed connections to servers behind NAT are upgraded to direct ones where the NATs allow
    # (DCUtR hole punching, docs/nat.md); False: they stay on the relay.
    direct_upgrade: bool = True
    # A private swarm's key (transport/private_network.py): every connection proves it first; None:
    # the open swarm. Taken when the model is created.
    swarm_key: SwarmKey | None = None
    # A swarm with revocable membership: the owner's peer ID, whose signed member list (from the
    # DHT) says which servers' records count (swarm/membership.py); None: every server's.
    swarm_owner: str | None = None
    # This client's key file (a stable peer ID, which a member list can name); None: a new one each start.
    identity_file: str | None = None

    def __post_init__(self) -> None:
        if self.adapter is None:  # the CLI's "no --adapter"
            object.__setattr__(self, "adapter", "")
        if self.wire not in WIRE_CHOICES:
            raise ValueError(f"unknown wire {self.wire!r}: use {', '.join(WIRE_CHOICES)}")
