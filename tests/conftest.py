from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "petald-cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-sharded") / "llama", sharded=True)


@pytest.fixture(scope="session")
def smollm_swarm():
    """Five real server processes for SmolLM2: a 2-way split and a 3-way split."""
    from petald.cli.local_swarm import LocalSwarm

    with LocalSwarm(["0:15", "15:30", "0:10", "10:20", "20:30"], extra_args=["--threads", "1"]) as swarm:
        yield swarm
