"""Training through remote blocks: the span's own forward and backward, deep prompts, the
training protocol and client pipeline, checked against transformers' autograd on the same weights."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from petald.kernels.executor import DeviceExecutor
from petald.kernels.quant import Int4Linear, Int8Linear, PrepackedBf16Linear, onednn_bf16_supported
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from petald.kernels.training_forward import span_backward, span_forward
from petald.p2pnode.client.training_pipeline import chunk_rows
from petald.p2pnode.routing.route import RemoteServer, SpanRoute
from petald.protocol.messages import ServerInfo, SpanOutput, SpanRequest
from tests.oracle import reference_model

HIDDEN = 64
VOCAB = 320


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float tolerance scaled to the gradient's size (gradients of random models run into the hundreds)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-7)


def decoder_layers(ref) -> torch.nn.ModuleList:
    """transformers' decoder layers of ``ref``, wherever its family keeps them (Falcon's and BLOOM's: ``h``)."""
    return getattr(ref.base_model, "layers", None) or ref.base_model.h


def _with_deep_prompts(ref, deep: torch.Tensor | None):
    """Hooks that add ``deep`` [blocks, 1 or batch, P, hidden] to the first positions before each
    decoder layer of transformers' model: what the servers do with deep prompts."""
    if deep is None:
        return []

    def shifted(index):
        def shift(h):
            n = deep.shape[2]
            return torch.cat([h[:, :n] + deep[index], h[:, n:]], dim=1)
        return shift

    return [layer.register_forward_pre_hook(_replacing_hidden(shifted(i)), with_kwargs=True)
            for i, layer in enumerate(decoder_layers(ref))]


def _replacing_hidden(change):
    """A forward pre-hook (with kwargs) that hands a decoder layer ``change(hidden_states)`` instead."""
    def hook(module, args, kwargs):
        if args:
            return (change(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
    return hook


def reference_prompt_loss(model_dir: str, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None):
    """Loss and gradients of the prompts (shallow [P, H], deep [blocks, 1 or B, P, H]) by
    transformers' autograd: the oracle for gradients through the swarm."""
    ref = reference_model(model_dir)
    p = prompts.clone().requires_grad_()
    d = deep.clone().requires_grad_() if deep is not None else None
    hooks = _with_deep_prompts(ref, d)
    try:
        x = torch.cat([p[None].expand(ids.shape[0], -1, -1), ref.get_input_embeddings()(ids)], dim=1)
        logits = ref(inputs_embeds=x).logits[:, p.shape[0]:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return loss.detach(), p.grad, (d.grad if d is not None else None)


def _block_outputs(ref, ids_or_embeds: torch.Tensor, last: int):
    seen = {}
    hook = decoder_layers(ref)[last].register_forward_hook(
        lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        ref(inputs_embeds=ids_or_embeds)
    finally:
        hook.remove()
    return seen["out"]


# --- the span's own forward and backward -------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "llama3", "qwen3", "phi3", "gemma2", "mixtral",
                                    "falcon", "bloom"])
@pytest.mark.parametrize("prompt_rows", [0, 1, 3])  # no deep prompts, shared ones, one per row
def test_span_backward_equals_transformers_autograd(tiny_models, family, prompt_rows):
    path = str(tiny_models[family])
    ref = reference_model(path)
    span = BlockSpan(open_source(path), 0, 6, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    embeds = ref.get_input_embeddings()(torch.randint(0, VOCAB, (3, 30), generator=g)).detach()  # crosses mistral's window
    deep = torch.randn(6, prompt_rows, 4, HIDDEN, generator=g) * 0.3 if prompt_rows else None
    grad_out = torch.randn(3, 30, HIDDEN, generator=g)

    x = embeds.clone().requires_grad_()
    d = deep.clone().requires_grad_() if deep is not None else None
    # The first block takes x itself, as a span does (BLOOM's model would LayerNorm its embeddings first).
    hooks = [decoder_layers(ref)[0].register_forward_pre_hook(_replacing_hidden(lambda h: x), with_kwargs=True)]
    hooks += _with_deep_prompts(ref, d)
    try:
        expected = _block_outputs(ref, x, 5)
        (expected * grad_out).sum().backward()
    finally:
        for h in hooks:
            h.remove()

    with torch.no_grad():
        torch.testing.assert_close(span_forward(span, embeds, 0, 6, deep), expected, atol=1e-4, rtol=1e-4)
    grad_hidden, grad_prompts = span_backward(span, embeds, grad_out, 0, 6, deep)
    assert_grads_close(grad_hidden, x.grad)
    if deep is None:
        assert grad_prompts is None
    else:
        assert grad_prompts.shape == deep.shape
        assert_grads_close(grad_prompts, d.grad)


def test_a_sub_span_backward_chains_to_the_whole(tiny_models):
    """Backward through 0:2 then 2:6 (what two servers do) equals backward through 0:6."""
    span = BlockSpan(open_source(str(tiny_models["llama"])), 0, 6, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(2, 9, HIDDEN, generator=g), torch.randn(2, 9, HIDDEN, generator=g)
    deep = torch.randn(6, 1, 3, HIDDEN, generator=g) * 0.2
    with torch.no_grad():
        middle = span_forward(span, x, 0, 2, deep[:2])
    grad_middle, grad_late = span_backward(span, middle, grad, 2, 6, deep[2:])
    grad_x, grad_early = span_backward(span, x, grad_middle, 0, 2, deep[:2])
    whole_x, whole_deep = span_backward(span, x, grad, 0, 6, deep)
    assert_grads_close(grad_x, whole_x)
    assert_grads_close(torch.cat([grad_early, grad_late]), whole_deep)


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear])
def test_quantized_layers_backward_through_their_own_weights(layer_type):
    g = torch.Generator().manual_seed(3)
    layer = layer_type(torch.randn(96, 64, generator=g), None)
    x = torch.randn(5, 64, generator=g, dtype=torch.float32)
    # The dequantized matrix is the one the kernel multiplies by (up to the kernels' bfloat16 rounding).
    y = x.bfloat16().float() @ layer.dense_weight().t()
    torch.testing.assert_close(layer.matmul(x), y, atol=1e-2 * float(y.abs().max()), rtol=1e-2)
    x.requires_grad_()
    grad = torch.randn(5, 96, generator=g)
    (layer(x) * grad).sum().backward()
    assert_grads_close(x.grad, grad @ layer.dense_weight())


@pytest.mark.skipif(not onednn_bf16_supported(), reason="this CPU has no native bfloat16 dot products for oneDNN")
def test_prepacked_bfloat16_layers_backward_as_plain_bfloat16_autograd():
    # oneDNN's prepacked kernel has no autograd formula of its own (torch would warn and return
    # nothing useful): the gradient must come through the layer's plain copy of the weights.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=g)
    layer = PrepackedBf16Linear(w, None)
    x = torch.randn(5, 64, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(5, 96, generator=g).bfloat16()
    (layer(x) * grad).sum().backward()
    plain = x.detach().clone().requires_grad_()
    (F.linear(plain, w.bfloat16()) * grad).sum().backward()
    assert torch.equal(x.grad, plain.grad)


def test_bfloat16_span_gradients_stay_close_to_float32(tiny_models):
    path = str(tiny_models["llama"])
    full = BlockSpan(open_source(path), 0, 6, torch.float32, torch.device("cpu"))
    half = BlockSpan(open_source(path), 0, 6, torch.bfloat16, torch.device("cpu"))
    g = torch.Generator().manual_seed(6)
    x, grad = torch.randn(2, 7, HIDDEN, generator=g), torch.randn(2, 7, HIDDEN, generator=g)
    want, _ = span_backward(full, x, grad, 0, 6)
    got, _ = span_backward(half, x, grad, 0, 6)  # computed in bfloat16, returned in float32
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0.05)


def test_int8_span_gradients_stay_close_to_float32(tiny_models):
    path = str(tiny_models["llama"])
    dense = BlockSpan(open_source(path), 0, 6, torch.float32, torch.device("cpu"))
    int8 = BlockSpan(open_source(path), 0, 6, torch.float32, torch.device("cpu"), quant="int8")
    g = torch.Generator().manual_seed(4)
    x, grad = torch.randn(2, 12, HIDDEN, generator=g), torch.randn(2, 12, HIDDEN, generator=g)
    exact, _ = span_backward(dense, x, grad, 0, 6)
    approx, _ = span_backward(int8, x, grad, 0, 6)
    assert F.cosine_similarity(exact.flatten(), approx.flatten(), dim=0) > 0.99


def test_inference_with_deep_prompts_equals_the_training_forward(tiny_models):
    """Deep prompts through the paged cache (a prefill cut into chunks smaller than the prompt, then
    decode steps), batched with a session without prompts, equal the whole-sequence forward."""
    span = BlockSpan(open_source(str(tiny_models["llama"])), 0, 6, torch.float32, torch.device("cpu"))
    executor = DeviceExecutor(span, prefill_chunk=3)
    pool = span.new_pool(4096)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 12, HIDDEN, generator=g)
    deep = torch.randn(6, 2, 5, HIDDEN, generator=g) * 0.3
    other = torch.randn(1, 12, HIDDEN, generator=g)
    try:
        results = {}

        def run(name, cache, hidden, prompts):
            done = threading.Event()

            def finished(result, error):
                results[name] = error if error is not None else result
                done.set()
            executor.submit(cache, hidden, 0, 6, torch.float32, finished, prompts)
            assert done.wait(60)
            if isinstance(results[name], BaseException):
                raise results[name]
            return results[name]

        prompted, plain = pool.open(2, 12), pool.open(1, 12)
        outs, plain_outs = [], []
        for first, last in ((0, 7), (7, 8), (8, 12)):
            threads = [threading.Thread(target=lambda f=first, la=last: outs.append(
                           run("p", prompted, tokens[:, f:la], deep if f == 0 else None))),
                       threading.Thread(target=lambda f=first, la=last: plain_outs.append(
                           run("q", plain, other[:, f:la], None)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        with torch.no_grad():
            torch.testing.assert_close(torch.cat(outs, 1), span_forward(span, tokens, 0, 6, deep), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.cat(plain_outs, 1), span_forward(span, other, 0, 6), atol=1e-4, rtol=1e-4)
    finally:
        executor.shutdown()


def test_the_executor_runs_tasks_and_reports_their_errors(tiny_models):
    span = BlockSpan(open_source(str(tiny_models["llama"])), 0, 2, torch.float32, torch.device("cpu"))
    executor = DeviceExecutor(span)
    got = []
    done = threading.Event()

    def record(result, error):
        got.append((result, error))
        if len(got) == 2:
            done.set()
    try:
        executor.submit_task(lambda: 42, record)
        executor.submit_task(lambda: 1 / 0, record)
        assert done.wait(10)
    finally:
        executor.shutdown()
    assert got[0] == (42, None)
    assert isinstance(got[1][1], ZeroDivisionError)


# --- the wire and the client's planning --------------------------------------------------------

def test_span_requests_round_trip():
    hidden, grad, prompts = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(3, 1, 2, 8)
    request = SpanRequest("m", "f" * 64, 1, 4, hidden, grad, prompts, "style")
    back = SpanRequest.from_wire(request.to_wire())
    assert back.backward and back.adapter == "style" and (back.start, back.end) == (1, 4)
    for a, b in ((back.hidden, hidden), (back.grad_output, grad), (back.prompts, prompts)):
        torch.testing.assert_close(a, b)
    forward = SpanRequest.from_wire(SpanRequest("m", "f" * 64, 0, 2, hidden).to_wire())
    assert not forward.backward and forward.prompts is None
    out = SpanOutput.from_wire(SpanOutput(grad, prompts, backward=True).to_wire())
    assert out.backward
    torch.testing.assert_close(out.grad_prompts, prompts)


def test_every_chunk_of_a_wide_model_fits_in_one_backward_frame():
    """hidden 4096 (a 7B model): chunks sized on the tensor limit alone overflowed the frame limit."""
    from petald.protocol.framing import encode_frame
    from petald.protocol.limits import MAX_FRAME_BYTES

    for prompts in (None, torch.zeros(4, 1, 16, 4096), torch.zeros(4, 64, 16, 4096)):
        rows = chunk_rows(64, 128, 4096, 1024, prompts)
        r = rows[0]
        hidden = torch.zeros(r.stop - r.start, 128, 4096)
        chunk_prompts = None if prompts is None else prompts[:, : 1 if prompts.shape[1] == 1 else r.stop - r.start]
        request = SpanRequest("m", "f" * 64, 0, 4, hidden, hidden, chunk_prompts)
        assert len(encode_frame(request.to_wire())) <= MAX_FRAME_BYTES
        assert sum(x.stop - x.start for x in rows) == 64


def test_an_abandoned_training_job_never_runs(tiny_models):
    import trio

    from petald.p2pnode.server.executor_bridge import run_task

    span = BlockSpan(open_source(str(tiny_models["llama"])), 0, 2, torch.float32, torch.device("cpu"))
    executor = DeviceExecutor(span)
    busy, ran = threading.Event(), []
    try:
        executor.submit_task(lambda: busy.wait(30), lambda result, error: None)  # holds the device thread

        async def main():
            with trio.move_on_after(0.2):
                await run_task(executor, lambda: ran.append("late"))
            busy.set()
            assert await run_task(executor, lambda: "next") == "next"  # the queue moved past it

        trio.run(main)
    finally:
        busy.set()
        executor.shutdown()
    assert ran == []


def test_chunks_hold_whole_sequences_within_the_limits():
    assert chunk_rows(10, 100, 64, 1024) == [slice(0, 10)]
    assert chunk_rows(10, 300, 64, 1024) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert chunk_rows(3, 5000, 64, 1024) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # one long row each
    with pytest.raises(ValueError, match="shorter sequences"):
        chunk_rows(1, 200_000, 8192, 1024)


def _server(peer: str, start: int, end: int, forward_tps: float) -> RemoteServer:
    info = ServerInfo("m", "f", 6, start, end, "float32", 64, 512, 10**6, "0")
    return RemoteServer(peer, "/ip4/127.0.0.1/tcp/1/p2p/" + peer, info, 0.001, 100.0, forward_tps)


def test_training_chunks_spread_over_replicas():
    servers = [_server("a", 0, 6, 1000.0), _server("b", 0, 6, 1000.0), _server("c", 0, 6, 500.0)]
    busy: dict[str, float] = {}
    used = []
    for _ in range(5):
        route = SpanRoute.plan(servers, 0, 6, tokens=512, busy=busy)
        hop = route.hops[0]
        busy[hop.server.peer_id] = busy.get(hop.server.peer_id, 0.0) + hop.server.hop_cost(6, 512)
        used.append(hop.server.peer_id)
    # Work goes where it finishes soonest: the replica with half the throughput takes one chunk
    # for every two of each fast one.
    assert sorted(used) == ["a", "a", "b", "b", "c"]


# --- through real server processes -------------------------------------------------------------

@pytest.fixture(scope="module")
def training_swarm(tiny_models):
    from petald.cli.local_swarm import LocalSwarm

    path = str(tiny_models["llama"])
    with LocalSwarm(["0:2", "2:6", "2:4", "4:6"], model=path, extra_args=["--threads", "1"]) as swarm:
        yield path, swarm


def _prompt_case(seed: int = 7, batch: int = 4, tokens: int = 11, num_prompts: int = 3, prompt_rows: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, tokens), generator=g)
    prompts = torch.randn(num_prompts, HIDDEN, generator=g) * 0.5
    deep = torch.randn(6, prompt_rows, num_prompts, HIDDEN, generator=g) * 0.3
    return ids, prompts, deep


def _swarm_prompt_loss(model, ids, prompts, deep):
    p, d = prompts.clone().requires_grad_(), deep.clone().requires_grad_()
    x = torch.cat([p[None].expand(ids.shape[0], -1, -1), model.head.embed_detached(ids)], dim=1)
    logits = model.head.logits_with_grad(model.remote_blocks(x, d))[:, p.shape[0]:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), p.grad, d.grad


@pytest.mark.slow
@pytest.mark.parametrize("prompt_rows", [1, 4])
def test_gradients_through_two_and_three_servers_equal_local_autograd(training_swarm, prompt_rows):
    from petald.p2pnode.client.distributed_model import DistributedModel

    path, swarm = training_swarm
    a = swarm.addresses
    ids, prompts, deep = _prompt_case(prompt_rows=prompt_rows)
    expected = reference_prompt_loss(path, ids, prompts, deep)
    for peers, hops in (([a[0], a[1]], 2), ([a[0], a[2], a[3]], 3)):
        # 28 tokens per chunk: the batch of 4 runs as 2 chunks in parallel.
        with DistributedModel(peers, path, wire="float32", max_chunk_tokens=28) as model:
            assert len(model.route().hops) == hops
            loss, grad_prompts, grad_deep = _swarm_prompt_loss(model, ids, prompts, deep)
        torch.testing.assert_close(loss, expected[0], atol=1e-5, rtol=1e-5)
        assert_grads_close(grad_prompts, expected[1])
        assert_grads_close(grad_deep, expected[2])


@pytest.mark.slow
def test_prompt_tuning_trains_saves_and_generates_like_the_oracle(training_swarm, tmp_path):
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.client.prompt_tuning import PromptTuning

    path, swarm = training_swarm
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with DistributedModel(swarm.addresses, path, wire="float32") as model:
        tuned = PromptTuning(model, num_prompts=4, deep=True)
        optimizer = torch.optim.Adam(tuned.parameters(), lr=0.1)
        losses = []
        for _ in range(8):
            loss = tuned.loss(ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, losses
        assert float(tuned.deep_prompts.detach().abs().sum()) > 0  # the servers' gradients reached the deep prompts
        tuned.save(tmp_path / "prompt.safetensors")
        loaded = PromptTuning.load(model, tmp_path / "prompt.safetensors")
        generated = loaded.generate(ids[:1], max_new_tokens=8, eos_token_id=[])

    # The oracle: transformers with the same prompts, greedy by recomputing the whole sequence.
    ref = reference_model(path)
    deep = loaded.deep_prompts.detach()[:, None]
    hooks = _with_deep_prompts(ref, deep)
    try:
        seq = ids[:1]
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([loaded.prompts.detach()[None], ref.get_input_embeddings()(seq)], dim=1)
                seq = torch.cat([seq, ref(inputs_embeds=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in hooks:
            h.remove()
    assert generated.tolist() == seq.tolist()


@pytest.mark.slow
def test_training_goes_on_when_servers_die_mid_step(tiny_models):
    """A server killed between the forward and the backward: its blocks' backward runs on two others
    (the forward is redone through the first to get the second's input). A server killed before a
    forward: the forward carries on from its blocks elsewhere. Gradients stay exact either way."""
    from petald.cli.local_swarm import LocalSwarm
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.routing.route import NoRouteError

    path = str(tiny_models["llama"])
    ids, prompts, deep = _prompt_case(seed=9, batch=2)
    expected = reference_prompt_loss(path, ids, prompts, deep)
    with LocalSwarm(["0:2", "2:6", "2:4", "4:6", "4:6"], model=path, extra_args=["--threads", "1"]) as swarm:
        s0, s1, s2, s3, s4 = swarm.servers
        # Peers given directly have no figures: routes take the fewest hops, ties going to the first listed.
        with DistributedModel(swarm.addresses, path, wire="float32", step_timeout=10, recovery_timeout=20) as model:
            p, d = prompts.clone().requires_grad_(), deep.clone().requires_grad_()
            x = torch.cat([p[None].expand(2, -1, -1), model.head.embed_detached(ids)], dim=1)
            logits = model.head.logits_with_grad(model.remote_blocks(x, d))[:, 3:]  # through 0:2 and 2:6
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            s1.process.kill()
            s1.process.wait()
            loss.backward()  # 2:6's backward now runs through 2:4 and 4:6
            assert_grads_close(p.grad, expected[1])
            assert_grads_close(d.grad, expected[2])
            assert [(r.start, r.end) for r in model.recoveries] == [(2, 6)]

            s3.process.kill()  # the next forward's 4:6 (the first listed): found dead mid-forward
            s3.process.wait()
            loss, grad_prompts, grad_deep = _swarm_prompt_loss(model, ids, prompts, deep)
            torch.testing.assert_close(loss, expected[0], atol=1e-5, rtol=1e-5)
            assert_grads_close(grad_prompts, expected[1])
            assert_grads_close(grad_deep, expected[2])
            assert [(r.start, r.end) for r in model.recoveries] == [(2, 6), (4, 6)]
            assert all(model.bans.is_banned(r.peer_id) for r in model.recoveries)

            # Nobody holds 4:6 any more: the error is NoRouteError itself (not an exception group of
            # the parallel chunks), within the recovery timeout.
            s4.process.kill()
            s4.process.wait()
            # One sequence per chunk: two chunks in parallel.
            model.options = dataclasses.replace(model.options, recovery_timeout=2, max_chunk_tokens=14)
            with pytest.raises(NoRouteError, match="4:6"):
                _swarm_prompt_loss(model, ids, prompts, deep)
        for alive in (s0, s2):
            assert alive.process.poll() is None


def test_an_inference_session_takes_deep_prompts_for_the_blocks_it_routes():
    """Deep prompts are indexed by block: a session over blocks [0, 3) needs those three, and more
    are not used; fewer, or a prompt of no tokens, are refused before any server sees them."""
    from petald.kernels.sources.model_source import ModelIdentity
    from petald.p2pnode.client.inference_session import InferenceSession
    from petald.p2pnode.routing.route import SpanHop

    info = ServerInfo("m@0", "ab", 6, 0, 3, "float32", 64, 64, 1000, "0.1.0")
    route = SpanRoute((SpanHop(RemoteServer("peer", "address", info), 0, 3),))
    identity = ModelIdentity("m", "ab" * 32, 6)
    for blocks in (3, 6, 7):
        session = InferenceSession(None, route, identity, 1, 10, deep_prompts=torch.zeros(blocks, 1, 2, 64))
        assert session.deep_prompts.shape[0] == blocks
    for prompts in (torch.zeros(2, 1, 2, 64), torch.zeros(3, 1, 0, 64), torch.zeros(3, 2, 2, 64)):
        with pytest.raises(ValueError, match=rf"deep_prompts have shape \[{', '.join(map(str, prompts.shape))}\]; "
                                             r"expected \[3, 1 or 1, 1 to 10 tokens, 64\]"):
            InferenceSession(None, route, identity, 1, 10, deep_prompts=prompts)
