"""Generations while servers are killed, frozen and restarted at random.

    python benchmarks/chaos.py [--generations 60] [--tokens 32] [--kill-every 8] [--hang-share 0.25]

A swarm of real ``petald serve`` processes for SmolLM2 covers every block twice
(spans 0:10, 10:20, 20:30, each served by two processes). While one client runs
``--generations`` greedy generations one after another through the DHT, a chaos
thread picks a random server every ``--kill-every`` seconds (exponentially
distributed) and either SIGKILLs it or, with probability ``--hang-share``, SIGSTOPs
it (a hang: its connections stay open). ``--restart-after`` seconds later it kills
what is left of it and starts a new server on the same span. The first server is the
swarm's bootstrap node and is never touched, as a swarm's initial peers are stable.

The oracle is transformers' own model on the same GGUF. Reported: the share of
generations that completed, the share token-identical to the oracle, and the
recovery time (from noticing a failure to the replacement holding the replayed
history) at p50 and p95. Noticing a hang takes the client's ``--step-timeout`` on top.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from petald.cli.local_swarm import LocalSwarm, ServerProcess  # noqa: E402
from petald.kernels.sources.open_source import default_gguf_path  # noqa: E402

SPANS = ["0:10", "10:20", "20:30"] * 2
PROMPTS = ["The capital of France is", "Rivers flow to the sea because", "A good recipe for bread needs",
           "The three laws of motion are", "In the year 2000, computers", "My favourite animal is"]


STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"{time.monotonic() - STARTED:7.1f} s  {text}", file=sys.stderr, flush=True)


def oracle_tokens(prompts: list[torch.Tensor], tokens: int) -> list[list[int]]:
    """transformers' greedy tokens for each prompt, never stopping at EOS."""
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
            out.append(generated[0, ids.shape[1]:].tolist())
    return out


class Chaos:
    """Kills, freezes and restarts servers of ``swarm`` (never the first) until stopped."""

    def __init__(self, swarm: LocalSwarm, kill_every: float, hang_share: float, restart_after: float, seed: int):
        self.swarm, self.kill_every, self.hang_share, self.restart_after = swarm, kill_every, hang_share, restart_after
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.events: list[str] = []
        self.restarts: list[threading.Thread] = []
        self.doomed: set[int] = set()  # pids already faulted, waiting for their restart
        self.start_seconds: list[float] = []  # a restarted server's start to routable
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _victims(self) -> list[ServerProcess]:
        # Only routable servers: killing one that is still starting would only lose the restart.
        return [s for s in self.swarm.servers[1:]
                if s.address and s.process.poll() is None and s.process.pid not in self.doomed]

    def _run(self) -> None:
        while not self.stop.wait(self.random.expovariate(1.0 / self.kill_every)):
            victims = self._victims()
            if not victims:
                continue
            victim = self.random.choice(victims)
            self.doomed.add(victim.process.pid)
            hang = self.random.random() < self.hang_share
            victim.process.send_signal(signal.SIGSTOP if hang else signal.SIGKILL)
            self.events.append(f"{'froze' if hang else 'killed'} {victim.blocks}")
            say(f"chaos: {'froze' if hang else 'killed'} the server of blocks {victim.blocks}")
            restart = threading.Thread(target=self._restart, args=(victim,), daemon=True)
            restart.start()
            self.restarts.append(restart)

    def _restart(self, victim: ServerProcess) -> None:
        time.sleep(self.restart_after)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.send_signal(signal.SIGCONT)
        victim.process.wait()
        if self.stop.is_set():
            return
        try:
            server = self.swarm.add(victim.blocks)
            assert server.ready_at is not None
            self.start_seconds.append(server.ready_at - server.started_at)
            say(f"chaos: restarted a server for blocks {victim.blocks} "
                f"(routable {self.start_seconds[-1]:.0f} s after its start)")
        except RuntimeError as exc:
            say(f"chaos: the restart of blocks {victim.blocks} failed: {exc}")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--kill-every", type=float, default=8.0, help="mean seconds between two faults")
    parser.add_argument("--hang-share", type=float, default=0.25, help="share of faults that are SIGSTOP hangs")
    parser.add_argument("--restart-after", type=float, default=10.0,
                        help="seconds from a fault to the restart (longer than the step timeout, so hangs are seen)")
    parser.add_argument("--step-timeout", type=float, default=4.0)
    parser.add_argument("--recovery-timeout", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The client's recovery warnings, on the same clock as the chaos lines.
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)9.0f ms  %(name)s: %(message)s")

    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.distributed_model import DistributedModel

    torch.set_num_threads(1)
    tokenizer = open_source(None).load_tokenizer()
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS]
    say("computing the oracle's tokens with transformers")
    expected = oracle_tokens(prompts, args.tokens)
    server_args = ["--threads", "1", "--announce-period", "5"]
    with LocalSwarm(SPANS, extra_args=server_args, log=say) as swarm:
        model = DistributedModel(initial_peers=[swarm.servers[0].address], step_timeout=args.step_timeout,
                                 recovery_timeout=args.recovery_timeout)
        chaos = Chaos(swarm, args.kill_every, args.hang_share, args.restart_after, args.seed)
        chaos.thread.start()
        completed = identical = 0
        failures: list[str] = []
        began = time.monotonic()
        try:
            for index in range(args.generations):
                ids = prompts[index % len(prompts)]
                try:
                    out = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
                except Exception as exc:  # a failed generation is a result here, not a crash
                    failures.append(f"{type(exc).__name__}: {exc}")
                    say(f"generation {index + 1}/{args.generations} failed: {exc}")
                    continue
                completed += 1
                same = out[0, ids.shape[1]:].tolist() == expected[index % len(PROMPTS)]
                identical += same
                say(f"generation {index + 1}/{args.generations}: {'identical' if same else 'DIFFERENT'} "
                    f"({len(model.recoveries)} recoveries so far)")
        finally:
            chaos.stop.set()
            elapsed = time.monotonic() - began
            for restart in chaos.restarts:  # so that no server starts after the swarm has stopped
                restart.join(300)
            model.close()
    seconds = [r.seconds for r in model.recoveries]
    # A recovery either found a live server it knew (routing is instant) or had to wait for one.
    known = [r.seconds for r in model.recoveries if r.routing_seconds < 0.5]
    result = {
        "generations": args.generations, "tokens_each": args.tokens, "faults": len(chaos.events),
        "hangs": sum(e.startswith("froze") for e in chaos.events),
        "completed_share": completed / args.generations,
        "identical_share": identical / args.generations,
        "recoveries": len(seconds),
        "recovery_s_p50": round(statistics.median(seconds), 3) if seconds else None,
        "recovery_s_p95": round(percentile(seconds, 0.95), 3) if seconds else None,
        "recoveries_to_a_known_server": len(known),
        "known_server_recovery_s_p50": round(statistics.median(known), 3) if known else None,
        "known_server_recovery_s_p95": round(percentile(known, 0.95), 3) if known else None,
        "restart_to_routable_s_p50": round(statistics.median(chaos.start_seconds), 1) if chaos.start_seconds else None,
        "wall_s": round(elapsed, 1), "failures": failures,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
