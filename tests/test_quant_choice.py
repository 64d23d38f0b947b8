"""``--quant auto`` and ``--head-quant auto`` (kernels/quant_choice.py): the rule, the streamed
whole-model agreement against the plain whole-model forward, the cache, and a real server choosing."""

from __future__ import annotations

import json

import pytest
import torch

from petald.kernels.cache_dir import petald_cache_dir
from petald.kernels.client_head import ClientHead
from petald.kernels.quant_choice import (
    AGREEMENT_BOUND,
    MeasuredMode,
    choose,
    choose_block_quant,
    choose_head_quant,
    final_hiddens,
    reference_ids,
)
from petald.kernels.sources.open_source import open_source
from petald.kernels.span import BlockSpan
from petald.vocabulary import HEAD_QUANT_MODES, QUANT_MODES

CPU = torch.device("cpu")


def test_the_fastest_mode_that_agrees_enough_wins_and_none_always_qualifies():
    none, int8, int4 = MeasuredMode("none", 1.0, 1.0), MeasuredMode("int8", 0.7, 0.99), MeasuredMode("int4", 0.5, 0.99)
    assert choose([none, int8, int4]) == "int4"
    assert choose([none, int8, MeasuredMode("int4", 0.5, AGREEMENT_BOUND - 0.01)]) == "int8"
    assert choose([none, MeasuredMode("int8", 0.7, 0.5), MeasuredMode("int4", 0.5, 0.5)]) == "none"
    assert choose([none, MeasuredMode("int4", 1.2, 0.99)]) == "none"  # agrees, but slower
    assert choose([none, MeasuredMode("int4", 0.5, AGREEMENT_BOUND)]) == "int4"  # the bound itself qualifies


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_the_streamed_model_equals_the_whole_span(tiny_models, quant):
    """One block at a time, every mode beside the others, gives what the whole span gives."""
    source = open_source(str(tiny_models["llama"]))
    ids = reference_ids(source, 40)
    assert ids.shape == (1, 40)  # the tiny model speaks SmolLM2's tokenizer: real text
    streamed = final_hiddens(source, ids, {"float32": (torch.float32, "none"), quant: (torch.float32, quant)}, CPU)
    span = BlockSpan(source, 0, source.identity.num_blocks, torch.float32, CPU, quant=quant)
    whole = span.forward(ClientHead(source).embed(ids), span.new_cache(1, 40))
    torch.testing.assert_close(streamed[quant], whole.float(), atol=1e-4, rtol=1e-4)


def test_a_block_choice_measures_every_mode_and_caches_the_agreements(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))  # not the session's: servers of other tests fill that
    source = open_source(str(tiny_models["llama"]))
    said: list[str] = []
    choice = choose_block_quant(source, torch.float32, CPU, said.append)
    assert [m.mode for m in choice.measured] == ["none", "int8", "int4"]
    assert choice.chosen in QUANT_MODES and choice.measured[0].agreement == 1.0
    assert all(0 <= m.agreement <= 1 and m.seconds > 0 for m in choice.measured)
    assert any("block 6/6" in line for line in said)  # the agreement check showed its progress
    cached = json.loads((petald_cache_dir() / "quant_choice.json").read_text())
    assert sum(source.identity.fingerprint in key for key in cached) >= 2
    said.clear()
    again = choose_block_quant(source, torch.float32, CPU, said.append)
    assert said == []  # agreements from the cache: no block streamed again
    assert [m.agreement for m in again.measured] == [m.agreement for m in choice.measured]
    line = choice.describe("--quant")
    assert line.startswith(f"--quant auto: {choice.chosen} (") and "int4" in line and "top-1" in line


def test_a_head_choice_measures_every_head_storage(tiny_models):
    source = open_source(str(tiny_models["llama"]))
    choice = choose_head_quant(source, CPU)
    modes = [m.mode for m in choice.measured]
    assert modes[0] == "none" and set(modes) <= set(HEAD_QUANT_MODES) and "int8" in modes
    assert choice.chosen in modes


def test_the_real_model_int4_blocks_pass_the_bound():
    """SmolLM2's int4 blocks (the default GGUF is 4-bit already) agree with float32 on >= 97% of
    the reference text: what lets --quant auto take them where they are faster."""
    source = open_source(None)
    choice = choose_block_quant(source, torch.float32, CPU)
    agreements = {m.mode: m.agreement for m in choice.measured}
    assert agreements["int4"] >= AGREEMENT_BOUND, agreements


@pytest.mark.slow
def test_a_server_with_quant_auto_announces_the_mode_it_chose(tiny_models):
    from petald.cli.local_swarm import LocalSwarm
    from petald.p2pnode.client.distributed_model import DistributedModel

    path = str(tiny_models["llama"])
    with LocalSwarm(["0:6"], model=path, extra_args=["--threads", "1"], quant="auto") as swarm:
        said = [line for line in swarm.servers[0].output if "--quant auto: " in line]
        assert len(said) == 1, swarm.servers[0].output
        chosen = said[0].split("--quant auto: ", 1)[1].split(" ", 1)[0]
        assert chosen in QUANT_MODES
        with DistributedModel(swarm.addresses, path, head_quant="auto") as model:
            assert [s.info.quant for s in model.servers] == [chosen]
            assert model.head.quant in HEAD_QUANT_MODES
            ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(2))
            assert model.generate(ids, max_new_tokens=4, eos_token_id=[]).shape == (1, 10)
