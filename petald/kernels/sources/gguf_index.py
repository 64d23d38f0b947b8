"""A GGUF file's tensor index: each tensor's name, type, shape and bytes, read without parsing
the metadata's values.

gguf-py's ``GGUFReader`` builds a numpy view for every metadata item on open: a tokenizer's
~49k strings make ~250k views, 2.5-3 s before anything else can happen, on every start of a
client or a server. A model source needs one metadata value (``general.alignment``, where the
tensor data starts); the config and the tokenizer are parsed once and cached by
``gguf_source``. So this walks the key/value section with ``struct``, stepping over each value
by its size, then reads the tensor infos. Tensors come back as gguf-py's reader gives them
(the same numpy views over the memory-mapped file, the same shapes), so dequantizing and the
weights fingerprint do not change.

Format (little-endian): magic ``GGUF``, version, tensor count, key/value count; the key/values;
the tensor infos (name, dims fastest-first, type, offset); padding to the alignment; the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32  # the format's default when the file names none
ALIGNMENT_KEY = "general.alignment"

# Bytes of each fixed-size metadata value type (strings and arrays are sized as they are read).
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
# Tensor types stored as plain numbers, as gguf-py's reader types them; the rest are bytes.
_PLAIN_TYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


_LENGTH = struct.Struct("<Q")


class GGUFIndexError(ValueError):
    """Not a GGUF file this reader understands, or one cut short."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, fastest-first (as gguf-py's ReaderTensor.shape)
    data: np.ndarray  # a view of the memory-mapped file (as gguf-py's ReaderTensor.data)


class _Cursor:
    """Reads fields in place (``struct.unpack_from`` on the mapped file: no copy per field)."""

    def __init__(self, buffer: np.memmap):
        self.view, self.size, self.offset = memoryview(buffer), len(buffer), 0

    def _advance(self, size: int) -> int:
        start, end = self.offset, self.offset + size
        if size < 0 or end > self.size:
            raise GGUFIndexError(f"the file ends at byte {self.size}, inside a field at byte {start}")
        self.offset = end
        return start

    def take(self, size: int) -> bytes:
        start = self._advance(size)
        return bytes(self.view[start:start + size])

    def unpack(self, fmt: str) -> tuple:
        layout = struct.Struct("<" + fmt)
        return layout.unpack_from(self.view, self._advance(layout.size))

    def string(self) -> str:
        (length,) = self.unpack("Q")
        return self.take(length).decode("utf-8", errors="replace")

    def skip_value(self, value_type: int) -> None:
        if value_type == GGUFValueType.STRING:
            (length,) = self.unpack("Q")
            self._advance(length)
        elif value_type in _SCALAR_BYTES:
            self._advance(_SCALAR_BYTES[GGUFValueType(value_type)])
        elif value_type == GGUFValueType.ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in _SCALAR_BYTES:
                self._advance(count * _SCALAR_BYTES[GGUFValueType(item_type)])
            elif item_type == GGUFValueType.STRING:
                self._skip_strings(count)
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            raise GGUFIndexError(f"unknown metadata value type {value_type} at byte {self.offset}")

    def _skip_strings(self, count: int) -> None:
        # The tokenizer's vocabulary: tens of thousands of strings, so the loop stays tight.
        length_of, view, offset, size = _LENGTH.unpack_from, self.view, self.offset, self.size
        for _ in range(count):
            if offset + 8 > size:
                raise GGUFIndexError(f"the file ends at byte {size}, inside a string array")
            offset += 8 + length_of(view, offset)[0]
        if offset > size:
            raise GGUFIndexError(f"the file ends at byte {size}, inside a string array")
        self.offset = offset


def read_gguf_index(path: str | Path) -> list[GGUFTensor]:
    """The tensors of the GGUF file at ``path``, in file order; GGUFIndexError for a bad file."""
    buffer = np.memmap(path, mode="r")
    cursor = _Cursor(buffer)
    if cursor.take(4) != GGUF_MAGIC:
        raise GGUFIndexError("no GGUF magic at the start")
    (version,) = cursor.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFIndexError(f"GGUF version {version} (this reader knows {SUPPORTED_VERSIONS}; "
                             "a big-endian file reads as a huge version)")
    tensor_count, kv_count = cursor.unpack("QQ")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cursor.string()
        (value_type,) = cursor.unpack("I")
        if key == ALIGNMENT_KEY and value_type == GGUFValueType.UINT32:
            (alignment,) = cursor.unpack("I")
        else:
            cursor.skip_value(value_type)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFIndexError(f"{ALIGNMENT_KEY} is {alignment}, not a power of two")
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        (n_dims,) = cursor.unpack("I")
        dims = np.frombuffer(cursor.take(8 * n_dims), dtype="<u8").copy()
        raw_type, offset = cursor.unpack("IQ")
        infos.append((name, dims, raw_type, offset))
    data_start = -(-cursor.offset // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise GGUFIndexError(f"tensor {name} is listed twice")
        seen.add(name)
        tensors.append(_tensor(buffer, name, dims, raw_type, data_start + offset))
    return tensors


def _tensor(buffer: np.memmap, name: str, dims: np.ndarray, raw_type: int, start: int) -> GGUFTensor:
    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFIndexError(f"tensor {name} has unknown type {raw_type}") from None
    elements = int(np.prod(dims))
    shape = tuple(int(d) for d in reversed(dims.tolist()))  # numpy's order: slowest-first
    plain = _PLAIN_TYPES.get(tensor_type)
    if plain is not None:
        dtype, count = np.dtype(plain), elements
    else:
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        dtype, count = np.dtype(np.uint8), elements * type_size // block_size
        shape = quant_shape_to_byte_shape(shape, tensor_type)
    end = start + count * dtype.itemsize
    if end > len(buffer):
        raise GGUFIndexError(f"tensor {name}'s data runs past the end of the file ({end} > {len(buffer)} bytes)")
    data = buffer[start:end].view(dtype)[:count].reshape(shape)
    return GGUFTensor(name, tensor_type, dims, data)
