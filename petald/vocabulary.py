"""The names every room agrees on: compute and wire dtypes, weight quantization modes, defaults.

The wire (``protocol``) checks them, the compute (``kernels``) implements them and the command
line offers them as choices; ``protocol`` and ``kernels`` may not import each other, and the CLI
must load without torch, so the names live here, below every room, in plain strings.
This module imports nothing.
"""

# Dtypes by name: what a server computes in (--dtype) and what hidden states travel as (--wire-dtype).
DTYPE_NAMES = ("float32", "float16", "bfloat16")

# How hidden states travel (--wire; protocol/limits.py, docs/protocol.md "Wire formats"): "float16"
# sends a tensor that float16 cannot hold as bfloat16, "int8" is blockwise absmax. A client may also
# say "auto" (the default): 16-bit, or int8 on a hop whose link is slow for its round trip.
WIRE_FORMAT_NAMES = ("float32", "bfloat16", "float16", "int8")
WIRE_CHOICES = ("auto", *WIRE_FORMAT_NAMES)

# Weight-only quantization of a server's blocks (--quant), as kernels/quant.py implements it.
QUANT_MODES = ("none", "int8", "int4", "nf4")

# How a client may store its LM head (--head-quant): the blocks' modes, plus "bf16" (bfloat16
# weights, the normed hidden state rounded to bfloat16; kernels/client_head.py).
HEAD_QUANT_MODES = (*QUANT_MODES, "bf16")

# What --quant and --head-quant accept: a mode, or "auto" (kernels/quant_choice.py: the fastest mode on
# this machine whose top-1 agreement with float32 on the reference text is at least 97%).
QUANT_CHOICES = ("auto", *QUANT_MODES)
HEAD_QUANT_CHOICES = ("auto", *HEAD_QUANT_MODES)

DEVICE_CHOICES = ("auto", "cpu", "cuda")

# Where a node listens unless told (--listen): loopback, a port the system picks.
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
