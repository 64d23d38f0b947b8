"""Continuous batching: concurrent sessions' steps run as one forward, prefills are chunked so that
decode steps are served in between, and every session gets what it would get alone."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from petald.cli.local_swarm import LocalSwarm
from petald.kernels.client_head import ClientHead
from petald.kernels.executor import BatchedForward, DeviceExecutor, StepJob
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

    def submit(self, name: str, cache, hidden: torch.Tensor) -> StepJob:
        event = self._events[name] = threading.Event()

        def done(result, error):
            with self._lock:
                self.finished.append(name)
                self.results[name] = error if error is not None else result
            event.set()

        return self.executor.submit(cache, hidden, 0, TINY_BLOCKS, torch.float32, done)

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


def test_a_cancelled_prefill_is_dropped_between_chunks(tiny_span):
    """Issue 22, hole 1: a step whose waiter gave up must not keep the executor for its whole length."""
    span, head = tiny_span
    pool = span.new_pool(512 * TINY_BLOCKS)
    cache = pool.open(1, 480)
    jobs = []

    def cancel_after_first_chunk(forward: BatchedForward) -> None:
        if any(ran is cache for ran, _ in forward.steps):
            jobs[0].cancel()  # on the executor thread, between this chunk and the next

    executor = DeviceExecutor(span, prefill_chunk=16, on_forward=cancel_after_first_chunk)
    try:
        steps = Steps(executor)
        ids = torch.randint(0, 320, (1, 480), generator=torch.Generator().manual_seed(1))
        with steps.holding(pool.open(1, 4), head.embed(torch.tensor([[1]]))):
            jobs.append(steps.submit("long", cache, head.embed(ids)))
        with pytest.raises(ValueError, match="cancelled"):
            steps.wait("long")
        assert cache.length == 16  # one chunk of 30 ran
    finally:
        executor.shutdown()


def test_concurrent_prefills_take_turns(tiny_span):
    """One long prompt must not hold another session's prompt for its whole length either."""
    span, head = tiny_span
    pool = span.new_pool(2 * 64 * TINY_BLOCKS + 16 * TINY_BLOCKS)
    forwards: list[BatchedForward] = []
    executor = DeviceExecutor(span, prefill_chunk=16, on_forward=forwards.append)
    try:
        steps = Steps(executor)
        first, second = pool.open(1, 64), pool.open(1, 64)
        ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(3))
        with steps.holding(pool.open(1, 4), head.embed(torch.tensor([[1]]))):
            forwards.clear()
            steps.submit("first", first, head.embed(ids))
            steps.submit("second", second, head.embed(ids))
        torch.testing.assert_close(steps.wait("first"), steps.wait("second"))
        turns = [id(f.steps[0][0]) for f in forwards]
        assert turns == [id(first), id(second)] * 4
    finally:
        executor.shutdown()


def test_a_step_that_ends_after_its_waiter_gave_up_frees_its_pages_once(tiny_span):
    """The event loop's side of hole 1: the pages of a step still running when its session ends
    are freed when the executor drops it, by the action ``when_ended`` registered, exactly once."""
    import trio

    from petald.p2pnode.server.executor_bridge import StepInFlight, run_step

    span, head = tiny_span
    pool = span.new_pool(496 * TINY_BLOCKS)
    executor = DeviceExecutor(span, prefill_chunk=16)
    release = threading.Event()
    freed: list[int] = []

    async def main() -> None:
        cache = pool.open(1, 480)
        busy = threading.Event()
        executor.submit_task(lambda: busy.set() or release.wait(60), lambda result, error: None)
        while not busy.is_set():  # the executor is in the task: the step below waits for its next turn
            await trio.sleep(0.01)
        flight = StepInFlight()
        with trio.move_on_after(0.05) as scope:
            await run_step(executor, cache, head.embed(torch.randint(0, 320, (1, 480))), 0, TINY_BLOCKS,
                           torch.float32, flight)
        assert scope.cancelled_caught and flight.running
        flight.cancel()
        flight.when_ended(lambda: freed.append(pool.free_tokens) or pool.close(cache))
        assert freed == [] and pool.free_tokens < pool.capacity_tokens
        release.set()
        with trio.fail_after(30):
            while not flight.ended:
                await trio.sleep(0.01)
        assert len(freed) == 1 and pool.free_tokens == pool.capacity_tokens
        assert cache.length == 0  # dropped before its first chunk
        flight.when_ended(lambda: freed.append(-1))  # after the end: at once
        assert freed[-1] == -1

    try:
        trio.run(main)
    finally:
        release.set()
        executor.shutdown()


def test_beside_decode_steps_a_turn_takes_only_the_prefill_tokens_that_keep_it_within_its_stretch(tiny_span):
    """A decode step waits for its whole turn: beside decode steps, the prefill budget is what the
    measured cost of a prefill token allows within DECODE_TURN_STRETCH of a decode-only turn."""
    from petald.kernels.executor import DECODE_TURN_STRETCH, MIN_PREFILL_TOKENS

    span, _ = tiny_span
    executor = DeviceExecutor(span, prefill_chunk=128)
    try:
        assert executor._prefill_budget(True) == 128  # nothing measured yet
        executor._learn(0.010, 0)  # decode steps alone: 10 ms
        executor._learn(0.050, 100)  # 100 prefill tokens added 40 ms
        assert executor._prefill_budget(True) == int(DECODE_TURN_STRETCH * 0.010 / 0.0004)
        assert executor._prefill_budget(False) == 128  # no decode step waits: the whole chunk
        executor._learn(1.010, 10)  # prefill tokens got far dearer
        assert executor._prefill_budget(True) == MIN_PREFILL_TOKENS
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
