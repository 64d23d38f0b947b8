"""Time per soft-prompt training step through 2 and 3 server processes against one process.

    python benchmarks/training_step.py [--steps 10] [--batch 8] [--tokens 32] [--prompts 8] [--threads 1]

One step is what examples/train_soft_prompt.py runs: embeddings with a soft prompt in front
(and, with --deep, a prefix for every block), the 30 blocks of SmolLM2 forward, the LM head and
the loss, then backward to the prompt. In one process the blocks run under local autograd
(kernels/training_forward.py); through servers, each server recomputes its forward on the
backward (it keeps nothing between requests). Every configuration runs in this one invocation,
one after another, so the ratios compare like with like on a noisy machine; the gradients of
each configuration are checked against the in-process ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from petald.cli.local_swarm import LocalSwarm, even_spans  # noqa: E402
from petald.kernels.client_head import ClientHead  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402
from petald.kernels.training_forward import span_forward  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def step(head: ClientHead, run_blocks, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None
         ) -> tuple[float, torch.Tensor]:
    """One training step's forward and backward; returns its seconds and the prompt's gradient."""
    p = prompts.clone().requires_grad_()
    d = deep.clone().requires_grad_() if deep is not None else None
    began = time.perf_counter()
    x = torch.cat([p[None].expand(ids.shape[0], -1, -1), head.embed_detached(ids)], dim=1)
    logits = head.logits_with_grad(run_blocks(x, d[:, None] if d is not None else None))[:, p.shape[0]:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return time.perf_counter() - began, p.grad


def measure(name: str, head, run_blocks, args, ids, prompts, deep, reference: torch.Tensor | None
            ) -> tuple[dict, torch.Tensor]:
    step(head, run_blocks, ids, prompts, deep)  # warm-up
    times, grad = [], None
    for i in range(args.steps):
        seconds, grad = step(head, run_blocks, ids, prompts, deep)
        times.append(seconds)
        say(f"{name}: step {i + 1}/{args.steps} {seconds * 1000:.0f} ms")
    result = {"ms_per_step": statistics.median(times) * 1000}
    if reference is not None:
        result["max_grad_diff_vs_one_process"] = float((grad - reference).abs().max())
    return result, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--deep", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in each server")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "training_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = open_source(args.model)
    n = source.identity.num_blocks
    head = ClientHead(source)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, source.config.vocab_size, (args.batch, args.tokens), generator=g)
    prompts = head.embed_detached(torch.randint(0, source.config.vocab_size, (args.prompts,), generator=g)).clone()
    deep = torch.zeros(n, args.prompts, source.config.hidden_size) if args.deep else None

    say("loading the blocks in this process ...")
    span = BlockSpan(source, 0, n, torch.float32, torch.device("cpu"))
    results = {}
    results["one process"], reference = measure(
        "one process", head, lambda x, d: span_forward(span, x, 0, n, d), args, ids, prompts, deep, None)
    for servers in (2, 3):
        spans = even_spans(n, servers)
        say(f"starting {servers} servers ({', '.join(spans)}) ...")
        with LocalSwarm(spans, model=args.model, extra_args=["--threads", str(args.threads)]) as swarm, \
                DistributedModel(swarm.addresses, source) as model:
            results[f"{servers} servers"], _ = measure(
                f"{servers} servers", model.head, lambda x, d: model.remote_blocks(x, d), args, ids, prompts, deep,
                reference)
    base = results["one process"]["ms_per_step"]
    for name, r in results.items():
        r["vs_one_process"] = r["ms_per_step"] / base
        extra = f", max |grad diff| {r['max_grad_diff_vs_one_process']:.1e}" if "max_grad_diff_vs_one_process" in r else ""
        print(f"{name:12s} {r['ms_per_step']:8.0f} ms/step  {r['vs_one_process']:.2f}x{extra}")
    record = {"args": vars(args), "machine": platform.platform(), "torch": torch.__version__,
              "cpus": os.cpu_count(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
