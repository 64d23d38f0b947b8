"""Continuous batching: concurrent sessions' steps run as one forward, prefills are chunked so that
decode steps are served in between, and every session gets what it would get alone."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from petald.cli.local_swarm import LocalSwarm
from petald.kernels.client_head import ClientHead
from petald.kernels.executor import BatchedForward, DeviceExecutor
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from petald.p2pnode.client.distributed_model import DistributedModel
from tests.oracle import reference_greedy
from tests.tiny_models import TINY_BLOCKS

CPU = torch.device("cpu")


class Steps:
    """Submit steps to an executor and wait for them from the test thread."""

    def __init__(self, executor: DeviceExecutor):
        self.executor = executor
        self.finished: list[str] = []
        self.results: dict[str, torch.Tensor] = {}
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def submit(self, name: str, cache, hidden: torch.Tensor) -> None:
        event = self._events[name] = threading.Event()

        def done(result, error):
            with self._lock:
                self.finished.append(name)
                self.results[name] = error if error is not None else result
            event.set()

        self.executor.submit(cache, hidden, 0, TINY_BLOCKS, torch.float32, done)

    @contextlib.contextmanager
    def holding(self, cache, hidden: torch.Tensor):
        """Keep the executor thread in the completion of a step of ``cache`` for the ``with`` block:
        the steps submitted meanwhile all wait for the executor's next turn."""
        held, release = threading.Event(), threading.Event()

        def done(result, error):
            held.set()
            assert release.wait(60)

        self.executor.submit(cache, hidden, 0, TINY_BLOCKS, torch.float32, done)
        assert held.wait(60), "the holding step never finished"
        try:
            yield
        finally:
            release.set()

    def wait(self, name: str) -> torch.Tensor:
        assert self._events[name].wait(60), f"step {name} never finished"
        result = self.results[name]
        if isinstance(result, BaseException):
            raise result
        return result


@pytest.fixture()
def tiny_span(tiny_models):
    source = open_source(str(tiny_models["llama"]))
    return BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU), ClientHead(source)


@pytest.mark.parametrize("name", ["llama", "falcon", "bloom"])  # rotary and the C kernel; parallel; ALiBi
def test_concurrent_decode_steps_run_as_one_forward_and_match_running_alone(tiny_models, name):
    source = open_source(str(tiny_models[name]))
    span, head = BlockSpan(source, 0, TINY_BLOCKS, torch.float32, CPU), ClientHead(source)
    prompts = [torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 7, 20)]
    nxt = torch.tensor([[5]])
    alone = []
    for ids in prompts:
        cache = span.new_cache(1, 32)
        span.forward(head.embed(ids), cache)
        alone.append(span.forward(head.embed(nxt), cache))

    pool = span.new_pool(5 * 32 * TINY_BLOCKS)
    forwards: list[BatchedForward] = []
    executor = DeviceExecutor(span, on_forward=forwards.append)
    try:
        steps = Steps(executor)
        caches = [pool.open(1, 32) for _ in prompts]
        for i, (ids, cache) in enumerate(zip(prompts, caches, strict=True)):
            steps.submit(f"prefill{i}", cache, head.embed(ids))
        for i in range(len(prompts)):
            steps.wait(f"prefill{i}")
        with steps.holding(pool.open(1, 4), head.embed(torch.tensor([[1]]))):
            forwards.clear()  # the holding step's own forward came before its completion
            for i, cache in enumerate(caches):
                steps.submit(f"decode{i}", cache, head.embed(nxt))
        for i in range(len(prompts)):
            torch.testing.assert_close(steps.wait(f"decode{i}"), alone[i], atol=1e-5, rtol=1e-5)
        # Ready together, the four steps ran as one forward, each session once, in the order
        # they came.
        assert [(f.start, f.end, f.adapter) for f in forwards] == [(0, TINY_BLOCKS, None)]
        ran = [(id(cache), tokens) for cache, tokens in forwards[0].steps]
        assert ran == [(id(c), 1) for c in caches]
    finally:
        executor.shutdown()


def test_a_decode_step_is_served_while_a_long_prefill_is_in_progress(tiny_span):
    span, head = tiny_span
    long_ids = torch.randint(0, 320, (1, 480), generator=torch.Generator().manual_seed(1))
    short_ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(2))
    want_long = span.forward(head.embed(long_ids), span.new_cache(1, 480))

    pool = span.new_pool(2 * 496 * TINY_BLOCKS)
    executor = DeviceExecutor(span, prefill_chunk=16)  # 30 turns for the long prompt
    try:
        steps = Steps(executor)
        short, long = pool.open(1, 16), pool.open(1, 480)
        steps.submit("short prefill", short, head.embed(short_ids))
        steps.wait("short prefill")
        steps.submit("long prefill", long, head.embed(long_ids))
        steps.submit("decode", short, head.embed(torch.tensor([[9]])))
        steps.wait("decode")
        steps.wait("long prefill")
        assert steps.finished.index("decode") < steps.finished.index("long prefill")
        torch.testing.assert_close(steps.results["long prefill"], want_long, atol=1e-4, rtol=1e-4)
    finally:
        executor.shutdown()


def test_a_closed_session_step_fails_alone(tiny_span):
    span, head = tiny_span
    pool = span.new_pool(2 * 32 * TINY_BLOCKS)
    executor = DeviceExecutor(span)
    try:
        steps = Steps(executor)
        gone, alive = pool.open(1, 32), pool.open(1, 32)
        pool.close(gone)
        steps.submit("gone", gone, head.embed(torch.tensor([[1, 2]])))
        steps.submit("alive", alive, head.embed(torch.tensor([[1, 2]])))
        with pytest.raises(ValueError, match="closed"):
            steps.wait("gone")
        assert steps.wait("alive").shape == (1, 2, 64)
    finally:
        executor.shutdown()


@pytest.mark.slow
def test_concurrent_sessions_through_a_server_match_the_oracle(tiny_models):
    path = str(tiny_models["llama"])
    prompts = [torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 9, 15, 30)]
    with LocalSwarm(["0:6"], model=path, extra_args=["--threads", "1"]) as swarm:
        with DistributedModel(swarm.addresses, path, wire="float32") as model:
            results: dict[int, list[int]] = {}

            def generate(i: int) -> None:
                out = model.generate(prompts[i], max_new_tokens=16, eos_token_id=[])
                results[i] = out[0, prompts[i].shape[1]:].tolist()

            threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    for i, ids in enumerate(prompts):
        assert results.get(i) == reference_greedy(path, ids, 16), f"session {i}"
