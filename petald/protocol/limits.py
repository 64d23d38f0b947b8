"""Protocol IDs and every hard limit of the wire, in one place (see docs/protocol.md)."""

from petald.vocabulary import DTYPE_NAMES, WIRE_FORMAT_NAMES

# Major version of the message schemas, carried in "open", training requests and server info.
# 2: one "wire" field (WIRE_FORMATS) replaced "wire_dtype" and "codec"; the int8 tensor codec.
# 3: a step may start before the session's end, which rolls the session back (speculative decoding).
WIRE_VERSION = 3

INFERENCE_PROTOCOL = "/petald/inference/1.0.0"
INFO_PROTOCOL = "/petald/info/1.0.0"
TRAINING_PROTOCOL = "/petald/training/1.0.0"  # stateless forward and backward over whole sequences
PUSH_PROTOCOL = "/petald/push/1.0.0"  # a server hands its step output to the next server's session
PUSH_TOKEN_BYTES = 16  # the secret a client gives a session, naming it to the servers that push to it

FRAME_HEADER_BYTES = 4
MAX_FRAME_BYTES = 32 * 1024 * 1024  # no frame, of any kind, is larger
MAX_TENSOR_BYTES = 24 * 1024 * 1024  # decoded size of one tensor; leaves room under the frame cap
MAX_TENSOR_DIMS = 4
MAX_BATCH = 64
MAX_STRING = 4096  # model ids, error messages
MAX_ARRAY_LEN = 16  # msgpack arrays: tensor shapes, adapter names, a step's push chain
MAX_MAP_LEN = 32  # msgpack maps (messages and tensors have a handful of fields)
MAX_FIRST_FRAME_BYTES = 64 * 1024  # info requests and session opens are small
# What a server holds of frames received in part, all peers together (``--receive-budget``): four
# of the largest at once. Past it a stream is refused with "busy" (p2pnode/transport/frame_budget.py).
RECEIVING_FRAMES_BUDGET_BYTES = 4 * MAX_FRAME_BYTES
WIRE_DTYPES = DTYPE_NAMES
# A server's signed DHT record lives at most this long after it was issued (protocol/announcement.py):
# its server republishes it well before, and one signed to live longer (expiry 1e12: for ever) is
# refused on store and on read, so that nothing a server once said outlives it by more than this.
MAX_RECORD_LIFETIME_S = 600.0

# The slowest link petald's timeouts allow for: a 10 Mbit/s home uplink (issue 18's range is
# 10-1000 Mbit/s). A frame's send timeout, and the wait for a step's answer, grow by the frame's
# transfer time at this rate, so that a large prefill over such a link is not taken for a hung
# peer: a 12 MB chunk (a float32 tensor at half MAX_TENSOR_BYTES) takes ~10 s; a decode step ~2 ms.
SLOWEST_LINK_BYTES_PER_S = 10_000_000 // 8


# The most bytes one value of a tensor can take on the wire: float32's 4, or int8's 7 at worst (its
# code, a float16 scale for a block of one, and as an outlier a float16 value and a uint16 position).
MAX_WIRE_BYTES_PER_VALUE = 8
# A step's bytes beyond its tensors, at most: its push chain (MAX_ARRAY_LEN targets, each with two
# strings of up to MAX_STRING characters of up to 4 UTF-8 bytes) and msgpack's own.
STEP_OVERHEAD_BYTES = MAX_ARRAY_LEN * 2 * 4 * MAX_STRING + 64 * 1024


def session_frame_bytes(batch: int, max_length: int, hidden_size: int, blocks: int) -> int:
    """The largest frame an inference session opened with these can need: one step of every position
    at once, with deep prompts for each of its blocks. A frame header announcing more is refused from
    the header alone, at once, instead of waiting for a body no step of the session could be."""
    values = batch * max_length * hidden_size
    hidden, prompts = (min(n * MAX_WIRE_BYTES_PER_VALUE, MAX_FRAME_BYTES) for n in (values, blocks * values))
    return min(MAX_FRAME_BYTES, hidden + prompts + STEP_OVERHEAD_BYTES)


def transfer_seconds(nbytes: int) -> float:
    """How long ``nbytes`` take over the slowest link petald's timeouts allow for."""
    return nbytes / SLOWEST_LINK_BYTES_PER_S


CODECS = ("raw", "lz4", "int8")  # how a tensor map's bytes are laid out (protocol/tensors.py)
WIRE_FORMATS = WIRE_FORMAT_NAMES  # how a session's hidden states travel (vocabulary.py)
INT8_BLOCK = 64  # values per int8 scale, along the last dimension
MAX_INT8_BLOCK = 4096
INT8_OUTLIERS = 8  # largest values of each row sent apart, in float16 (protocol/int8_blocks.py)
MAX_INT8_OUTLIERS = 64
