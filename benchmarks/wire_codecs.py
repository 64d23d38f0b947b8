"""What each wire format costs in accuracy and bytes, through a real local swarm of the real SmolLM2.

    python benchmarks/wire_codecs.py [--servers 2] [--tokens 16] [--text petald/kernels/reference_text.txt]

For every wire (float32, bfloat16, float16, int8, and auto, the default), one client of its own:

- top-1 agreement with the float32 wire, teacher-forced: the whole text goes through the swarm in one
  forward, and at every position the next-token argmax is compared with the float32 wire's;
- bytes per decode token per hop: a short prompt, then ``--tokens`` greedy decode steps; the client's
  link counts the frames its streams sent and received (``FramedStream`` counters: every frame, header
  included, so the pushes' late copies and the replies too); each server-to-server push hop counts the
  frame the pushing server sends, encoded from the step's real output with that hop's wire.

The swarm runs with pushes (the default): the client sends the first server the step, each server
answers the client and pushes its output on to the next. The servers announce ``--announce-mbps``
(default 1 Mbit/s): the clients above, given the servers directly, do not see it (no measured round
trip either), so their auto goes 16-bit; one more client, "auto via DHT", finds the servers through
the DHT with their round trips and that bandwidth, and picks per hop as ``client/wire_choice.py`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from petald.cli.local_swarm import LocalSwarm, even_spans  # noqa: E402
from petald.kernels.quant_choice import REFERENCE_TEXT  # noqa: E402
from petald.kernels.sources.open_source import open_source  # noqa: E402
from petald.p2pnode.client.distributed_model import DistributedModel  # noqa: E402
from petald.protocol.framing import encode_frame  # noqa: E402
from petald.protocol.messages import Step  # noqa: E402
from petald.vocabulary import WIRE_CHOICES  # noqa: E402

PROMPT = "The history of the printing press"
WIRES = ("float32", "bfloat16", "float16", "int8", "auto")
AUTO_VIA_DHT = "auto via DHT"
assert set(WIRES) == set(WIRE_CHOICES)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decode_bytes(model: DistributedModel, tokens: int) -> dict:
    """Frame bytes per decode token: the client's link, and each push hop's."""
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.inference_session(1, ids.shape[1] + tokens + 1) as session:
        hidden = model.node.call(session.step, model.head.embed(ids))
        links = session.links

        def client_bytes() -> int:
            return sum(link.span.framed.bytes_sent + link.span.framed.bytes_received for link in links)

        before = client_bytes()
        push_bytes = [0] * (len(links) - 1)
        for _ in range(tokens):
            nxt = model.head.logits(hidden[:, -1]).argmax(-1)
            step_input = model.head.embed(nxt[:, None])
            states = model.node.call(session.step_states, step_input)
            hidden = states[links[-1].hop.end]
            # The frame each server pushed: its real output, in the push hop's wire, with the rest of the chain.
            for i in range(len(links) - 1):
                chain = session._push_chain(i, step_input)
                if chain:
                    out = states[links[i].hop.end]
                    wire = chain[0].wire or links[i].span.wire
                    step = Step(chain[0].step_id - 1, session.position - 1, out, wire, push=chain[1:])
                    push_bytes[i] += len(encode_frame(step.to_wire()))
        client = (client_bytes() - before) / tokens
        return {"client_link_bytes_per_token": client,
                "push_hop_bytes_per_token": [b / tokens for b in push_bytes],
                "session_wires": [link.span.wire for link in links],
                "push_wires": [t.wire or links[i].span.wire  # "": the pushing session's own
                               for i, t in enumerate(session._push_chain(0, step_input))],
                "pushed_hop_steps": session.pushed_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(REFERENCE_TEXT))
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps measured for bytes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--announce-mbps", type=float, default=1.0, help="the bandwidth every server announces")
    parser.add_argument("--out", default="benchmarks/results/wire_codecs.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = open_source(None)
    ids = source.load_tokenizer()(Path(args.text).read_text(), return_tensors="pt").input_ids
    spans = even_spans(source.identity.num_blocks, args.servers)
    results: dict = {"model": source.identity.model_id, "servers": spans, "positions": ids.shape[1],
                     "announced_mbps": args.announce_mbps,
                     "decode_tokens": args.tokens, "cpu": cpu_name(), "wires": {}}
    say(f"{args.servers} servers ({', '.join(spans)}), {ids.shape[1]} positions of {Path(args.text).name}")
    extra = ["--threads", str(args.threads), "--network-mbps", str(args.announce_mbps)]
    with LocalSwarm(spans, extra_args=extra, log=say) as swarm:
        reference = None
        for wire in (*WIRES, AUTO_VIA_DHT):
            how = {"initial_peers": swarm.addresses[:1]} if wire == AUTO_VIA_DHT else {"peers": swarm.addresses}
            with DistributedModel(model=source, wire=wire.split()[0], **how) as model:
                say(f"wire {wire}: teacher-forced forward, then {args.tokens} decode steps")
                top1 = model.forward(ids)[0].argmax(-1)
                reference = top1 if reference is None else reference
                row = {"top1_agreement": (top1 == reference).float().mean().item(), **decode_bytes(model, args.tokens)}
            results["wires"][wire] = row
    base = results["wires"]["float32"]["client_link_bytes_per_token"]
    for row in results["wires"].values():
        row["client_link_vs_float32"] = row["client_link_bytes_per_token"] / base

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{results['model']}, {args.servers} servers, {ids.shape[1]} positions; CPU: {results['cpu']}\n")
    print("| wire | top-1 agreement with float32 | client link, bytes/decode token | vs float32 "
          "| each push hop, bytes/decode token | chosen (sessions; push hops) |")
    print("|---|---|---|---|---|---|")
    for wire, r in results["wires"].items():
        pushes = ", ".join(f"{b:.0f}" for b in r["push_hop_bytes_per_token"])
        chosen = f"{', '.join(r['session_wires'])}; {', '.join(r['push_wires'])}"
        print(f"| {wire} | {100 * r['top1_agreement']:.2f}% | {r['client_link_bytes_per_token']:.0f} "
              f"| {r['client_link_vs_float32']:.2f}x | {pushes} | {chosen} |")


if __name__ == "__main__":
    main()
