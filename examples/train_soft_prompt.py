"""Train a soft prompt through a petald swarm: SmolLM2 learns to label product reviews.

The model's weights stay on the servers, frozen; only the prompt (a few embeddings, and with
--deep a prefix for every block) lives here and trains, on gradients the servers send back.

    python examples/train_soft_prompt.py --local-swarm 2          # starts 2 servers on 127.0.0.1
    python examples/train_soft_prompt.py --initial-peers ADDR     # or any node of a running swarm

The data (examples/data/reviews_*.jsonl, 96 training and 24 test reviews written for this
example) is tiny on purpose. The script prints the loss of every step, the test accuracy before
and after (the label the model scores higher, " positive" or " negative"), saves the prompt, and
generates with it. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch

from petald import DistributedModel, LocalSwarm, PromptTuning
from petald.cli.local_swarm import even_spans

DATA = Path(__file__).parent / "data"
LABELS = (" positive", " negative")


def load(name: str) -> list[dict]:
    with open(DATA / name) as f:
        return [json.loads(line) for line in f]


def prompt_text(review: str) -> str:
    return f"Review: {review}\nSentiment:"


def training_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids, and labels that score only the label's tokens (and the end of text)."""
    seqs, scored = [], []
    for row in rows:
        head = tokenizer(prompt_text(row["text"]), add_special_tokens=False).input_ids
        tail = tokenizer(" " + row["label"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        seqs.append(head + tail)
        scored.append([-100] * len(head) + tail)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in scored])
    return ids, labels


@torch.no_grad()
def accuracy(tuned: PromptTuning, tokenizer, rows: list[dict]) -> float:
    """Share of reviews whose right label's first token scores higher than the other's."""
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids[0] for label in LABELS]
    right = 0
    for start in range(0, len(rows), 8):
        part = rows[start : start + 8]
        prompts = [tokenizer(prompt_text(r["text"]), add_special_tokens=False).input_ids for r in part]
        width = max(map(len, prompts))
        ids = torch.tensor([p + [tokenizer.eos_token_id] * (width - len(p)) for p in prompts])
        logits = tuned(ids)
        for row, p, r in zip(range(len(part)), prompts, part, strict=True):
            scores = logits[row, len(p) - 1, label_ids]
            right += LABELS[int(scores.argmax())].strip() == r["label"]
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--initial-peers", nargs="*", default=[], help="any node of a running swarm")
    parser.add_argument("--local-swarm", type=int, default=0, metavar="N", help="start N servers here instead")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="soft prompt length in tokens")
    parser.add_argument("--deep", action="store_true", help="also train a prefix for every block")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--save", default="soft_prompt.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.initial_peers) == bool(args.local_swarm):
        parser.error("give --initial-peers ADDR or --local-swarm N")

    torch.manual_seed(args.seed)
    train, test = load("reviews_train.jsonl"), load("reviews_test.jsonl")
    with contextlib.ExitStack() as stack:
        if args.local_swarm:
            print(f"starting {args.local_swarm} servers (SmolLM2-135M-Instruct) on 127.0.0.1 ...", flush=True)
            swarm = stack.enter_context(LocalSwarm(even_spans(30, args.local_swarm)))
            peers = swarm.addresses[:1]
        else:
            peers = args.initial_peers
        model = stack.enter_context(DistributedModel(initial_peers=peers))
        tokenizer = model.tokenizer
        tuned = PromptTuning(model, args.prompts, deep=args.deep, init_text="Classify the sentiment of the review.")
        print(f"route: {model.route().describe()}")
        before = accuracy(tuned, tokenizer, test)
        print(f"test accuracy before training: {before:.0%}")

        optimizer = torch.optim.Adam(tuned.parameters(), lr=args.lr)
        order = random.Random(args.seed)
        losses, seconds = [], []
        for step in range(args.steps):
            rows = order.sample(train, args.batch)
            ids, labels = training_batch(tokenizer, rows)
            began = time.perf_counter()
            loss = tuned.loss(ids, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - began)
            losses.append(loss.item())
            print(f"step {step + 1:3d}/{args.steps}  loss {loss.item():.3f}  {seconds[-1]:.2f} s", flush=True)

        after = accuracy(tuned, tokenizer, test)
        first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
        print(f"loss, mean of the first 5 steps: {first:.3f}; of the last 5: {last:.3f}")
        print(f"test accuracy: {before:.0%} before, {after:.0%} after")
        print(f"time per step: median {sorted(seconds)[len(seconds) // 2]:.2f} s "
              f"(batch {args.batch}, {args.prompts} prompt tokens{', deep' if args.deep else ''})")
        tuned.save(args.save)
        print(f"saved the prompt to {args.save}")

        for row in test[:3]:
            ids = tokenizer(prompt_text(row["text"]), add_special_tokens=False, return_tensors="pt").input_ids
            out = tuned.generate(ids, max_new_tokens=3)
            said = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            print(f"{row['text']!r} -> {said!r} (labelled {row['label']})")


if __name__ == "__main__":
    main()
