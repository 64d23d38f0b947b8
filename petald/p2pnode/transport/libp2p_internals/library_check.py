"""Which py-libp2p petald's data path is written for, every library internal it touches and why,
and the one check that walks that list at host start.

The supported range is written here, once, as ``SUPPORTED_LIBP2P``; ``tests/test_transport.py``
checks that pyproject.toml's libp2p requirement is the same range. The range is not read from
the installed petald's own metadata at run time: that describes whichever checkout was last
installed (an editable install of another tree, or none at all when petald runs from a source
tree on PYTHONPATH), and reading a requirement string needs ``packaging``, which petald does not
depend on. A drift between the two is a test failure, before any release.

``INTERNALS`` is data: one entry per attribute, method or constant of the library's objects that
``lean_transport``, ``direct_frames`` or ``window_credit`` (and the relay modules of ``transport/``:
``relay_service``, ``circuit_dialing``, ``dialback``, ``private_network``) read, call, replace or override, with
what it must look like and why petald touches it. ``check_library`` builds one of each library object
as the library does (``library_samples``) and walks the list, so a release that renames or
retypes any of them stops petald at start, naming each, instead of misbehaving mid-session.
Both the installed version and the objects are arguments, so the check itself is testable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import trio

SUPPORTED_LIBP2P = ((0, 8, 1), (0, 9))  # [low, high)
LIBP2P_REQUIREMENT = "libp2p>={},<{}".format(*(".".join(map(str, end)) for end in SUPPORTED_LIBP2P))
WHERE = "p2pnode/transport/libp2p_internals"


class LeanTransportError(RuntimeError):
    """The installed py-libp2p is not the one petald's data-path patches were written for."""


@dataclass(frozen=True)
class Expect:
    """What a touched value must be, in words (for the error) and as a test on it."""

    words: str
    holds: Callable[[Any, Mapping[str, Any]], bool]  # (value, the samples) -> fits


PRESENT = Expect("", lambda value, samples: True)
# Not an abstract one: were a release to drop a class's own method, an interface's abstract stub
# would still be found under the same name.
METHOD = Expect("a method", lambda value, samples: callable(value)
                and not getattr(value, "__isabstractmethod__", False))


def a(kind: type) -> Expect:
    module = "" if kind.__module__ == "builtins" else kind.__module__.split(".")[0] + "."
    return Expect(f"a {module}{kind.__name__}", lambda value, samples: isinstance(value, kind))


def exactly_a(sample: str) -> Expect:
    """The library's own class of that sample, not a subclass (the patches test ``type(x) is``)."""
    return Expect(f"a {sample}", lambda value, samples: type(value) is type(samples[sample]))


def member_of(sample: str) -> Expect:
    """A member of the library's class (an enum) kept as that sample."""
    return Expect(f"a {sample}", lambda value, samples: isinstance(value, samples[sample]))


def equal_to(wanted: Any, words: str) -> Expect:
    return Expect(words, lambda value, samples: value == wanted)


@dataclass(frozen=True)
class Internal:
    """One attribute, method or constant of py-libp2p's that the data path depends on."""

    owner: str  # a key of library_samples(): which library object
    name: str  # the attribute read, replaced or overridden on it
    expect: Expect
    why: str  # what petald does with it, and in which module


_LOCK = a(trio.Lock)
_EAGER = "swapped for an EagerLock while free (lean_transport)"
_READ = "the direct read checks it before taking buffered bytes (direct_frames)"
_WRITE = "the direct write checks it before sending (direct_frames)"
_ENCODE = Expect("a 2-byte big-endian length, then the message",
                 lambda encode, samples: encode(b"abc") == b"\x00\x03abc")
_CLOSED = Expect("an exception that takes expected_bytes and received_bytes",
                 lambda error, samples: issubclass(error, Exception)
                 and error("closed", expected_bytes=2, received_bytes=0).is_clean_close)

INTERNALS: tuple[Internal, ...] = (
    # the yamux connection
    Internal("Yamux", "__dict__", a(dict), "LeanYamux.adopt re-classes a built Yamux (no __slots__)"),
    Internal("Yamux", "streams_lock", _LOCK, _EAGER),
    Internal("Yamux", "_write_lock", _LOCK, _EAGER + "; the direct write sends under it"),
    Internal("Yamux", "_write_frame", METHOD, "LeanYamux overrides it: no per-frame debug formatting"),
    Internal("Yamux", "_read_data_body", METHOD, "LeanYamux overrides it: takes a decrypted body"),
    Internal("Yamux", "open_stream", METHOD, "LeanYamux puts each new stream on eager locks"),
    Internal("Yamux", "accept_stream", METHOD, "LeanYamux puts each new stream on eager locks"),
    Internal("Yamux", "secured_conn", PRESENT, "LeanYamux and the direct path reach the Noise session"),
    Internal("Yamux", "streams", a(dict), _READ + ": the stream is still registered"),
    Internal("Yamux", "stream_buffers", a(dict), "the direct read takes a stream's bytes (direct_frames); "
             "LeanYamux replaces it with WindowedBuffers (window_limit)"),
    Internal("Yamux", "handle_incoming", METHOD, "LeanYamux closes the connection after it when the peer "
             "sent past a window (window_limit)"),
    Internal("Yamux", "_cleanup_on_error", METHOD, "closes a connection whose peer sent past a window"),
    Internal("Yamux", "event_closed", a(trio.Event), "set once a connection is closed"),
    Internal("Yamux", "stream_events", a(dict), "the direct read waits on the reader's event (direct_frames)"),
    Internal("Yamux", "event_shutting_down", a(trio.Event), _READ),
    Internal("yamux", "logger", a(logging.Logger), "LeanYamux takes the library's write path when it logs"),
    Internal("yamux", "YAMUX_HEADER_FORMAT", PRESENT, "the direct write packs the library's header"),
    Internal("yamux", "HEADER_SIZE", a(int), "the largest frame the direct write sends at once"),
    Internal("yamux", "TYPE_DATA", PRESENT, "the direct write sends DATA frames (direct_frames)"),
    # a yamux stream
    Internal("YamuxStream", "window_lock", _LOCK, _EAGER + "; " + _WRITE),
    Internal("YamuxStream", "close_lock", _LOCK, _EAGER),
    Internal("YamuxStream", "rw_lock", exactly_a("ReadWriteLock"), "swapped for an EagerReadWriteLock"),
    Internal("YamuxStream", "conn", PRESENT, "the direct path finds the stream's connection"),
    Internal("YamuxStream", "stream_id", PRESENT, "the direct write addresses its DATA frame"),
    Internal("YamuxStream", "send_window", a(int), "the direct write spends it as the library does"),
    Internal("YamuxStream", "send_closed", PRESENT, _WRITE),
    Internal("YamuxStream", "closed", PRESENT, _WRITE + " and read"),
    Internal("YamuxStream", "recv_closed", PRESENT, _READ),
    Internal("YamuxStream", "reset_received", PRESENT, _READ),
    Internal("YamuxStream", "target_recv_window", a(int), "credit is batched per half of it (window_credit)"),
    Internal("YamuxStream", "recv_window", a(int), "what the peer may still send; more is refused (window_limit)"),
    Internal("YamuxStream", "_auto_tune_and_send_window_update", METHOD,
             "wrapped per stream to credit once per half window (window_credit); the direct read "
             "credits through it"),
    Internal("ReadWriteLock", "_readers", equal_to(0, "0 at rest"), "swapped only while unused"),
    Internal("ReadWriteLock", "_readers_lock", _LOCK, "an EagerLock in EagerReadWriteLock"),
    Internal("ReadWriteLock", "_writer_lock", a(trio.Semaphore),
             "eager in EagerReadWriteLock; the direct write checks that no writer holds it"),
    # the stream petald's protocols see
    Internal("NetStream", "muxed_stream", exactly_a("YamuxStream"), "the yamux stream under it"),
    Internal("NetStream", "_state", member_of("StreamState"),
             "the direct path checks it, and sets ERROR on a failure as NetStream does"),
    Internal("NetStream", "_state_lock", _LOCK, _EAGER + " on petald's own streams"),
    Internal("StreamState", "OPEN", PRESENT, "the direct path reads and writes in it"),
    Internal("StreamState", "CLOSE_READ", PRESENT, "the direct path still writes in it"),
    Internal("StreamState", "CLOSE_WRITE", PRESENT, "the direct path still reads in it"),
    Internal("StreamState", "ERROR", PRESENT, "the direct path sets it on a failed send or credit"),
    # Noise, and TCP under it
    Internal("SecureSession", "conn", exactly_a("NoiseTransportReadWriter"),
             "LeanNoise puts a BufferedNoiseReadWriter in its place"),
    Internal("SecureSession", "low_watermark", equal_to(0, "0 at start"), "LeanYamux: decrypted, unread"),
    Internal("SecureSession", "high_watermark", equal_to(0, "0 at start"), "LeanYamux: decrypted, unread"),
    Internal("SecureSession", "_drain", METHOD, "LeanYamux takes a DATA body from the decrypted buffer"),
    Internal("SecureSession", "read", METHOD,
             "the library's yamux reads through it; it fills the decrypted buffer LeanYamux drains, from "
             "BufferedNoiseReadWriter.read_msg"),
    Internal("SecureSession", "write", METHOD, "LeanYamux._write_frame sends each frame through it"),
    Internal("NoiseTransportReadWriter", "read_writer", exactly_a("NoisePacketReadWriter"),
             "BufferedNoiseReadWriter reaches the raw connection through it"),
    Internal("NoiseTransportReadWriter", "noise_state", PRESENT, "BufferedNoiseReadWriter keeps the cipher"),
    Internal("NoiseTransportReadWriter", "read_msg", METHOD, "BufferedNoiseReadWriter overrides it"),
    Internal("NoiseTransportReadWriter", "decrypt", METHOD, "BufferedNoiseReadWriter decrypts what it cuts"),
    Internal("NoiseTransportReadWriter", "encrypt", METHOD, "the direct write encrypts its frame"),
    Internal("NoiseTransportReadWriter", "prefix", a(bytes), "BufferedNoiseReadWriter strips it when asked"),
    Internal("NoisePacketReadWriter", "read_write_closer", exactly_a("RawConnection"), "the raw connection"),
    Internal("NoisePacketReadWriter", "size_len_bytes", equal_to(2, "2"), "BufferedNoiseReadWriter cuts by it"),
    Internal("NoisePacketReadWriter", "encode_msg", _ENCODE, "the direct write frames Noise itself"),
    Internal("noise.io", "MAX_PLAINTEXT_LENGTH", a(int), "the most one Noise message carries"),
    Internal("io.exceptions", "IncompleteReadError", _CLOSED,
             "BufferedNoiseReadWriter raises it on a close, with the counts, as the library's read does"),
    Internal("RawConnection", "stream", exactly_a("TrioTCPStream"), "its TCP stream's locks are swapped"),
    Internal("RawConnection", "read", METHOD,
             "BufferedNoiseReadWriter receives through it (64 KiB at a time), with its error mapping"),
    Internal("RawConnection", "write", METHOD,
             "the direct write sends its Noise message through it (direct_frames), with its error mapping"),
    Internal("TrioTCPStream", "read_lock", _LOCK, _EAGER),
    Internal("TrioTCPStream", "write_lock", _LOCK, _EAGER),
    # where a host's connections are built
    Internal("NoiseTransport", "secure_inbound", METHOD,
             "LeanNoise overrides it: the library's handshake, then the buffered reader"),
    Internal("NoiseTransport", "secure_outbound", METHOD,
             "LeanNoise overrides it: the library's handshake, then the buffered reader"),
    Internal("Swarm", "upgrader", exactly_a("TransportUpgrader"), "install hooks a petald host's connections"),
    Internal("TransportUpgrader", "muxer_multistream", exactly_a("MuxerMultistream"),
             "install hooks its new_conn, which builds Yamux by name whatever the host's options say"),
    Internal("MuxerMultistream", "new_conn", METHOD, "install wraps it to adopt each Yamux into LeanYamux"),
    # relays (transport/relay_service, circuit_dialing, dialback)
    Internal("Swarm", "dial_peer", METHOD, "install_circuit_dialing wraps it: the swarm skips /p2p-circuit"),
    Internal("Swarm", "transport_manager", PRESENT, "a dial-back dials through its TCP transport, off the swarm"),
    Internal("TransportUpgrader", "upgrade_security", METHOD, "a dial-back's Noise handshake proves the peer; "
             "install_private_network wraps it: every connection proves the swarm key first (private_network)"),
    Internal("CircuitV2Protocol", "_handle_reserve", METHOD,
             "RelayService overrides it: a reservation only for the sender, per-IP and total limits"),
    Internal("CircuitV2Protocol", "_handle_connect", METHOD, "RelayService overrides it: circuits per source, total"),
    Internal("CircuitV2Protocol", "_relay_data", METHOD, "RelayService overrides it: a circuit closes its own streams"),
    Internal("CircuitV2Protocol", "_send_status", METHOD, "RelayService sends its refusals through it"),
    Internal("CircuitV2Protocol", "_close_stream", METHOD, "RelayService closes refused and ended streams with it"),
    Internal("CircuitV2Protocol", "_active_relays", a(dict), "RelayService replaces it with a map that files nothing"),
    Internal("CircuitV2Protocol", "resource_manager", exactly_a("RelayResourceManager"),
             "RelayService puts its own reservation book in its place"),
    Internal("RelayResourceManager", "_reservations", a(dict), "RelayService counts and drops reservations in it"),
    Internal("RelayResourceManager", "_clean_expired", METHOD, "overridden: also drops disconnected peers"),
    Internal("RelayResourceManager", "_is_peer_connected", METHOD, "the reservation book asks it"),
    # protocol negotiation in one round trip (pipelined_select)
    Internal("TransportUpgrader", "security_multistream", exactly_a("SecurityMultistream"),
             "its multiselect client negotiates Noise on each dial"),
    Internal("SecurityMultistream", "multiselect_client", exactly_a("MultiselectClient"),
             "re-classed to PipelinedMultiselectClient"),
    Internal("MuxerMultistream", "multiselect_client", exactly_a("MultiselectClient"),
             "re-classed to PipelinedMultiselectClient"),
    Internal("MultiselectClient", "__dict__", a(dict), "re-classed when built (no __slots__)"),
    Internal("MultiselectClient", "select_one_of", METHOD,
             "PipelinedMultiselectClient overrides it: the header and one protocol in one flight"),
    Internal("multiselect_client", "MULTISELECT_PROTOCOL_ID", equal_to("/multistream/1.0.0", "/multistream/1.0.0"),
             "PipelinedMultiselectClient sends it"),
    Internal("multiselect_client", "PROTOCOL_NOT_FOUND_MSG", equal_to("na", "na"),
             "PipelinedMultiselectClient reads a refusal by it"),
    Internal("multiselect_client", "DEFAULT_NEGOTIATE_TIMEOUT", a(int), "PipelinedMultiselectClient's default"),
    Internal("multiselect_client", "is_valid_handshake", Expect("a check of the header",
             lambda check, samples: check("/multistream/1.0.0") and not check("/other")),
             "PipelinedMultiselectClient checks the peer's header with it"),
)


def library_samples() -> dict[str, Any]:
    """One of each library object that ``INTERNALS`` names, built as the library builds them.

    The imports are here, not at the top, so that a library without one of them is reported
    by ``check_library`` like any other missing piece.
    """
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_pair
    from libp2p.io import exceptions as io_exceptions
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.network.stream.net_stream import NetStream, StreamState
    from libp2p.network.swarm import Swarm
    from libp2p.peer.id import ID
    from libp2p.peer.peerstore import PeerStore
    from libp2p.protocol_muxer import multiselect_client
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.security.noise import io as noise_io
    from libp2p.security.noise.io import NoisePacketReadWriter, NoiseTransportReadWriter
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.security.secure_session import SecureSession
    from libp2p.security.security_multistream import SecurityMultistream
    from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
    from libp2p.stream_muxer.rw_lock import ReadWriteLock
    from libp2p.stream_muxer.yamux import yamux
    from libp2p.transport.upgrader import TransportUpgrader

    muxer = yamux.Yamux(secured_conn=None, peer_id=None, is_initiator=True)  # type: ignore[arg-type]
    stream = yamux.YamuxStream(1, muxer, True)
    tcp = TrioTCPStream(None)  # type: ignore[arg-type]
    raw = RawConnection(tcp, True)
    noise = NoiseTransportReadWriter(raw, None)  # type: ignore[arg-type]
    upgrader = TransportUpgrader({}, {})
    relay = CircuitV2Protocol(None)  # type: ignore[arg-type]
    session = SecureSession(local_peer=None, local_private_key=None, remote_peer=None,  # type: ignore[arg-type]
                            remote_permanent_pubkey=None, is_initiator=True, conn=noise)
    return {
        "Yamux": muxer, "YamuxStream": stream, "ReadWriteLock": ReadWriteLock(), "yamux": yamux,
        "NetStream": NetStream(stream, None, None), "StreamState": StreamState,  # type: ignore[arg-type]
        "SecureSession": session, "NoiseTransportReadWriter": noise, "noise.io": noise_io,
        "io.exceptions": io_exceptions,
        "NoiseTransport": NoiseTransport(create_new_key_pair(), noise_privkey=new_x25519_pair().private_key),
        "NoisePacketReadWriter": NoisePacketReadWriter(raw), "RawConnection": raw, "TrioTCPStream": tcp,
        "Swarm": Swarm(ID(b"petald"), PeerStore(), upgrader), "TransportUpgrader": upgrader,
        "MuxerMultistream": MuxerMultistream({}), "SecurityMultistream": SecurityMultistream({}),
        "CircuitV2Protocol": relay, "RelayResourceManager": relay.resource_manager,
        "MultiselectClient": multiselect_client.MultiselectClient(), "multiselect_client": multiselect_client,
    }


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(installed: str) -> None:
    low, high = SUPPORTED_LIBP2P
    if not low <= version_tuple(installed) < high:
        raise LeanTransportError(f"py-libp2p {installed} is installed; petald's data path ({WHERE}) is "
                                 f"written for {LIBP2P_REQUIREMENT}: install a version in that range")


def check_library(installed: str | None = None,
                  samples: Callable[[], Mapping[str, Any]] = library_samples,
                  internals: Sequence[Internal] = INTERNALS) -> None:
    """Refuse a py-libp2p outside the range, or one without every internal the data path touches.

    ``installed`` (default: the installed libp2p's version) and ``samples`` (default: the
    library's objects, built now) are what is checked; tests pass their own.
    """
    installed = version("libp2p") if installed is None else installed
    check_version(installed)
    try:
        built = samples()
    except Exception as exc:
        raise LeanTransportError(f"py-libp2p {installed}: building the library objects that {WHERE} "
                                 f"touches failed: {type(exc).__name__}: {exc}") from exc
    missing = []
    absent = object()
    for item in internals:
        owner = built.get(item.owner)
        value = getattr(owner, item.name, absent)
        try:
            fits = value is not absent and item.expect.holds(value, built)
        except Exception:
            fits = False  # e.g. a method that now takes other arguments
        if not fits:
            shape = f" ({item.expect.words})" if item.expect.words else ""
            missing.append(f"{item.owner}.{item.name}{shape}: {item.why}")
    if missing:
        raise LeanTransportError(f"py-libp2p {installed} does not have what petald's data path ({WHERE}) "
                                 "touches:\n  " + "\n  ".join(missing))


def refused_import(error: ImportError, installed: str | None = None) -> LeanTransportError:
    """The error to raise when the data path's own imports fail: the version first, else the name."""
    installed = version("libp2p") if installed is None else installed
    try:
        check_version(installed)
    except LeanTransportError as outside:
        return outside
    return LeanTransportError(f"py-libp2p {installed} lacks what petald's data path ({WHERE}) "
                              f"imports: {error}")


@functools.cache
def require_supported_library() -> None:
    """``check_library`` once per process (a failure is not cached: it raises again)."""
    check_library()
