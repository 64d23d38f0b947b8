from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import TINY_MODELS, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test (nor a process it starts) sees this machine's petald cache, config, daemon socket
    or PETALD_* settings."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("PETALD_CACHE_DIR", str(base / "petald-cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base / "runtime"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    for name in list(os.environ):
        if name.startswith("PETALD_") and name != "PETALD_CACHE_DIR":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-sharded") / "llama", sharded=True)


@pytest.fixture(scope="session")
def smollm_swarm():
    """Five real server processes for SmolLM2: a 2-way split and a 3-way split."""
    from petald.cli.local_swarm import LocalSwarm

    with LocalSwarm(["0:15", "15:30", "0:10", "10:20", "20:30"], extra_args=["--threads", "1"]) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def three_hop_swarm(tiny_models):
    """Tiny Llama servers for a 3-hop route (blocks 0:2, 2:4, 4:6) with two spares for its middle:
    test_push.py and test_speculation.py share it (a swarm costs half a minute to start on 2 busy
    cores), and each kills one middle server in its last test."""
    from petald.cli.local_swarm import LocalSwarm

    spans = ["0:2", "2:4", "2:4", "2:4", "4:6"]
    with LocalSwarm(spans, model=str(tiny_models["llama"]), extra_args=["--threads", "1"]) as swarm:
        yield swarm


@pytest.fixture(params=["avx512", "avx2"])
def cpu_kernels(request, monkeypatch) -> str:
    """Each of petald's C kernel sets forced in turn (PETALD_CPU_KERNELS), so that a CPU with AVX512 tests
    the AVX2 kernels too; a test skips, with the reason, a set this CPU lacks."""
    monkeypatch.setenv("PETALD_CPU_KERNELS", request.param)
    return request.param
