"""A client's settings, with their defaults written once: what ``DistributedModel(**settings)``
accepts and what its sessions and training pipelines read.

    DistributedModel(peers, wire_dtype="bfloat16", step_timeout=10)      # settings by name
    DistributedModel(peers, options=ClientOptions(codec="lz4"))          # or as one object
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientOptions:
    wire_dtype: str = "float32"  # hidden states on the wire (vocabulary.DTYPE_NAMES)
    codec: str = "raw"  # "raw" or "lz4" over the wire dtype's bytes
    step_timeout: float = 30.0  # for each server's answer: a hung server is replaced after it
    connect_timeout: float = 15.0  # to reach a server, or to join the swarm
    recovery_timeout: float = 60.0  # to wait for a server to take over blocks nobody serves
    # A LoRA adapter's name: only servers holding it are used, and they apply it ("": the base model).
    adapter: str = ""
    max_chunk_tokens: int = 1024  # the tokens of one training request (``remote_blocks``)
    # The local LM head, stored as ``ClientHead`` does (vocabulary.HEAD_QUANT_MODES): "bf16" is the fast choice
    # on CPUs with native bfloat16; "none" (float32) is the reference.
    head_quant: str = "none"
    # Servers pass each inference step's output on to the next server themselves (docs/protocol.md,
    # "Pushing steps"); False: every hop goes through this client.
    push: bool = True
    # A pushed step whose answer is this late (or 4x the hop's last step, if longer) is sent by the
    # client too: the push may have been lost between the servers.
    push_grace: float = 1.0
    # Relayed connections to servers behind NAT are upgraded to direct ones where the NATs allow
    # (DCUtR hole punching, docs/nat.md); False: they stay on the relay.
    direct_upgrade: bool = True

    def __post_init__(self) -> None:
        if self.adapter is None:  # the CLI's "no --adapter"
            object.__setattr__(self, "adapter", "")
