"""Speculative decoding (prompt lookup) against plain decoding, on loopback and across a WAN of delay proxies.

    python benchmarks/speculation.py [--delays 0,25,50] [--rounds 3] [--tokens 96] [--speculate 8]

Three servers (SmolLM2-135M-Instruct, blocks 0:10, 10:20, 20:30, float32) each behind a delay
proxy of its own (``benchmarks/wan.py``'s swarm: every byte to a server waits the one-way delay),
pushes on, wire auto. For each delay, one client generates greedily for two tasks, in the model's
chat template:

- **edit**: repeat a given paragraph with its typos fixed (the answer copies the prompt: prompt
  lookup's case);
- **chat**: an open question (little to copy).

Each round runs every task plainly and with ``speculate=K``, alternating which goes first, so that
the load other processes put on the machine falls on both alike; the table gives the median over
rounds of each one's tokens per second after the first token (greedy: both produce the same tokens,
which the benchmark checks), their ratio, the share of drafts kept, the mean K chosen and the tokens
per verify step. The load average is printed before and after.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.wan import delayed_swarm, say  # noqa: E402  (three servers behind delay proxies)
from petald.kernels.sampling import end_of_sequence_ids  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402

EDIT = ("Rewrite this paragraph with the spelling mistakes fixed, and change nothing else:\n\n"
        "The river runs thrugh the old town, past the mill and the church, and under the stone brige that "
        "the people built four hundred years ago. In spring the water is high and fast; in sumer it is slow "
        "and clear, and children swim near the mill. Every autum the town holds a fair on the bank.")
CHAT = "What should I think about before adopting a dog?"
TASKS = {"edit": EDIT, "chat": CHAT}


def timed_generate(model: DistributedModel, ids: torch.Tensor, tokens: int, eos: list[int],
                   speculate: int) -> tuple[list[int], float]:
    """The new tokens and the tokens per second after the first one."""
    stamps: list[float] = []
    out = model.generate(ids, max_new_tokens=tokens, eos_token_id=eos, speculate=speculate,
                         streamer=lambda column: stamps.append(time.perf_counter()))
    new = out[0, ids.shape[1]:].tolist()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return new, rate


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--delays", default="0,25,50", help="one-way delays in ms")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--speculate", type=int, default=8, help="the most drafts per verify step (K)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--out", default="benchmarks/results/speculation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = open_source(args.model)
    tokenizer = source.load_tokenizer()
    eos = end_of_sequence_ids(source.config.eos_token_id, tokenizer.eos_token_id)
    prompts = {name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
               for name, text in TASKS.items()}
    results: dict = {"model": source.identity.model_id, "servers": 3, "speculate": args.speculate,
                     "tokens": args.tokens, "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores", "load_before": load(), "runs": []}
    say(f"load average before: {load()}")
    for delay in (float(d) for d in args.delays.split(",")):
        say(f"{delay:g} ms one way: starting 3 servers behind delay proxies")
        with delayed_swarm(delay, args.model, args.threads) as addresses, \
                DistributedModel(model=source, initial_peers=[addresses[0]]) as model:
            model.generate(prompts["chat"][:, :8], max_new_tokens=4)  # warm: routes, push streams, caches
            for name, ids in prompts.items():
                plain_rates, spec_rates, stats = [], [], []
                for round_ in range(args.rounds):
                    order = (0, args.speculate) if round_ % 2 == 0 else (args.speculate, 0)
                    outputs = {}
                    for k in order:
                        outputs[k], rate = timed_generate(model, ids, args.tokens, eos, k)
                        (spec_rates if k else plain_rates).append(rate)
                        if k:
                            stats.append(model.last_speculation)
                    if outputs[0] != outputs[args.speculate]:
                        raise SystemExit(f"{name}: speculation changed the greedy tokens")
                run = {"delay_ms": delay, "task": name, "new_tokens": len(outputs[0]),
                       "plain_tps": statistics.median(plain_rates), "speculative_tps": statistics.median(spec_rates),
                       "acceptance": sum(s.kept for s in stats) / max(1, sum(s.drafted for s in stats)),
                       "mean_k": statistics.mean(s.mean_k for s in stats),
                       "tokens_per_step": statistics.mean(s.tokens_per_step for s in stats)}
                run["ratio"] = run["speculative_tps"] / run["plain_tps"]
                results["runs"].append(run)
                say(f"  {name}: {run['plain_tps']:.1f} -> {run['speculative_tps']:.1f} tokens/s "
                    f"({run['ratio']:.2f}x), {run['acceptance']:.0%} kept, K {run['mean_k']:.1f}")
    results["load_after"] = load()
    say(f"load average after: {load()}")
    columns = {"one-way delay": lambda r: f"{r['delay_ms']:g} ms", "task": lambda r: r["task"],
               "new tokens": lambda r: str(r["new_tokens"]), "plain tokens/s": lambda r: f"{r['plain_tps']:.1f}",
               "speculative tokens/s": lambda r: f"{r['speculative_tps']:.1f}",
               "ratio": lambda r: f"{r['ratio']:.2f}x", "drafts kept": lambda r: f"{r['acceptance']:.0%}",
               "mean K": lambda r: f"{r['mean_k']:.1f}", "tokens per step": lambda r: f"{r['tokens_per_step']:.2f}"}
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in results["runs"]:
        print("| " + " | ".join(cell(r) for cell in columns.values()) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
