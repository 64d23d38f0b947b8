"""The GGUF tensor index against gguf-py's own reader, and bad files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

from petald.kernels.sources.gguf_index import read_gguf_index
from petald.kernels.sources.gguf_source import GGUFSource
from petald.kernels.sources.model_source import ModelSourceError
from petald.kernels.sources.open_source import default_gguf_path, open_source


def _write_gguf(path, alignment: int = 64) -> None:
    """Every kind of metadata value (strings, scalars, arrays of strings and numbers, nested arrays),
    an alignment other than the default, and tensors of plain and quantized types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(alignment)
    writer.add_token_list([f"tok{i}" * (i % 7) for i in range(300)])  # empty strings too
    writer.add_token_scores([float(i) for i in range(300)])
    writer.add_array("test.nested", [[1, 2, 3], ["a", "bc"]])
    writer.add_bool("test.flag", True)
    writer.add_string("test.text", "ünïcode")
    writer.add_uint64("test.big", 2**40)
    writer.add_tensor("plain.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("half.weight", np.arange(8, dtype=np.float16))
    quantized = gguf.quants.quantize(np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64),
                                     gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("quant.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _assert_same_as_gguf_py(path) -> None:
    ours, theirs = read_gguf_index(path), GGUFReader(path, "r").tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.tensor_type == reference.tensor_type, mine.name
        # The fingerprint hashes f"{list(shape)}": the same numpy integers, printed the same way.
        assert f"{list(mine.shape)}" == f"{list(reference.shape)}", mine.name
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data, reference.data), mine.name


def test_the_index_reads_every_tensor_as_gguf_py_does(tmp_path):
    _write_gguf(tmp_path / "all-kinds.gguf")
    _assert_same_as_gguf_py(tmp_path / "all-kinds.gguf")
    _assert_same_as_gguf_py(default_gguf_path())  # the embedded model: Q4_1 and float32 tensors


def test_the_weights_fingerprint_is_the_one_gguf_pys_tensors_give(tmp_path, monkeypatch):
    # Clients and servers of different petald versions must agree on a model's fingerprint.
    monkeypatch.setenv("PETALD_CACHE_DIR", str(tmp_path))  # computed here, not read from a cache
    source = GGUFSource(default_gguf_path())
    ours = source._fingerprint()
    source._tensors = {t.name: t for t in GGUFReader(default_gguf_path(), "r").tensors}
    assert source._fingerprint() == ours == source.identity.fingerprint


@pytest.mark.parametrize("damage", ["empty", "bad magic", "cut in the metadata", "cut in the tensor data",
                                    "unknown value type", "version 99"])
def test_a_damaged_gguf_is_refused_with_a_sentence(tmp_path, damage):
    good = tmp_path / "good.gguf"
    _write_gguf(good)
    data = bytearray(good.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "bad magic":
        data[:4] = b"GGML"
    elif damage == "cut in the metadata":
        data = data[:200]
    elif damage == "cut in the tensor data":
        data = data[:GGUFReader(good, "r").tensors[-1].data_offset + 5]
    elif damage == "unknown value type":
        at = data.index(b"test.flag") + len(b"test.flag")
        data[at:at + 4] = (99).to_bytes(4, "little")
    elif damage == "version 99":
        data[4:8] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match="is not a readable GGUF file"):
        open_source(str(bad))
