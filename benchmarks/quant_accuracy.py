"""Accuracy of each weight quantization against float32 on a reference text, with the real SmolLM2.

    python benchmarks/quant_accuracy.py [--text petald/kernels/reference_text.txt]

The text is tokenized and run teacher-forced through all 30 blocks once per
mode (float32, bfloat16, int8, int4; blocks alone, then with the client's LM
head quantized the same way); at every position the mode's logits are
compared with float32's: top-1 agreement (same argmax), max and mean absolute
logit difference, and the KL divergence of float32's next-token distribution
from the mode's (nats, mean over positions).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from petald.kernels.client_head import ClientHead  # noqa: E402
from petald.kernels.quant_choice import REFERENCE_TEXT  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.kernels.span import BlockSpan  # noqa: E402

# (compute dtype, block weights, client LM head weights)
MODES = [("float32", "none", "none"), ("bfloat16", "none", "none"), ("bfloat16", "none", "bf16"),
         ("float32", "none", "bf16"), ("float32", "int8", "none"), ("float32", "int4", "none"),
         ("float32", "int8", "int8"), ("float32", "int4", "int8"), ("float32", "int4", "bf16"),
         ("bfloat16", "int4", "bf16"), ("float32", "int4", "int4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(REFERENCE_TEXT))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/quant_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = open_source(None)
    ids = source.load_tokenizer()(Path(args.text).read_text(), return_tensors="pt").input_ids
    logits = {}
    for dtype, quant, head_quant in MODES:
        head = ClientHead(source, quant=head_quant)
        span = BlockSpan(source, 0, source.identity.num_blocks, getattr(torch, dtype), torch.device("cpu"), quant=quant)
        hidden = span.forward(head.embed(ids), span.new_cache(1, ids.shape[1]))
        logits[(dtype, quant, head_quant)] = head.logits(hidden)[0]
    want = logits[MODES[0]]
    rows = []
    for (dtype, quant, head_quant), got in logits.items():
        if (dtype, quant, head_quant) == MODES[0]:
            continue
        diff = (got - want).abs()
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
        rows.append({"dtype": dtype, "quant": quant, "head_quant": head_quant, "positions": ids.shape[1],
                     "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                     "max_logit_diff": diff.max().item(), "mean_logit_diff": diff.mean().item(), "kl": kl.item()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"Against float32, {ids.shape[1]} positions of {Path(args.text).name}:\n")
    print("| compute dtype | block weights | LM head | top-1 agreement | max logit diff | mean logit diff | KL (nats) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['quant']} | {r['head_quant']} | {100 * r['top1_agreement']:.1f}% | {r['max_logit_diff']:.3f} | "
              f"{r['mean_logit_diff']:.4f} | {r['kl']:.5f} |")


if __name__ == "__main__":
    main()
