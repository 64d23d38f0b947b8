"""Every piece of petald's data path that reaches into py-libp2p's internals, and the check that
they still fit. (The DHT's three lookups into the library's Kademlia, ``swarm/dht.py``, are checked
there, against the same supported range.)

The rest of the data path uses py-libp2p's public API only, and the lean path through the names
exported here: ``make_host`` takes ``LeanNoise``, ``install`` and ``require_supported_library``;
``FramedStream`` takes ``prepare_framed_stream``. Inside:

- ``library_check``: the supported libp2p range (written once; pyproject.toml's requirement is
  tested against it), ``INTERNALS`` (each library attribute, method or constant touched, what it
  must be, and why), and ``check_library``, which walks that list at host start;
- ``lean_transport``: eager locks, ``LeanYamux``, the buffered Noise reader (same wire, fewer
  scheduler passes per frame);
- ``direct_frames``: petald's frames straight between a FramedStream and its yamux stream;
- ``window_credit``: yamux window credit once per half window;
- ``window_limit``: a peer that sends past a yamux window is disconnected, its bytes dropped;
- ``pipelined_select``: multistream-select's header and protocol in one flight (one round trip
  per stream opened and per negotiation of a dial, instead of two).

These modules read the library's attributes directly, never through this package's namespace,
so the per-frame path costs what it did before they were grouped here.
"""

from __future__ import annotations

from libp2p.abc import INetStream

from petald.p2pnode.transport.libp2p_internals.library_check import (
    INTERNALS,
    LIBP2P_REQUIREMENT,
    SUPPORTED_LIBP2P,
    LeanTransportError,
    check_library,
    refused_import,
    require_supported_library,
)

try:
    from petald.p2pnode.transport.libp2p_internals.direct_frames import DirectStream
    from petald.p2pnode.transport.libp2p_internals.lean_transport import (
        BufferedNoiseReadWriter,
        EagerLock,
        LeanNoise,
        LeanYamux,
        install,
        lean_net_stream,
    )
    from petald.p2pnode.transport.libp2p_internals.window_credit import batch_window_updates
except ImportError as missing:
    if not (missing.name or "").startswith("libp2p"):
        raise
    raise refused_import(missing) from missing  # a py-libp2p that moved or dropped a name: say so

__all__ = ["INTERNALS", "LIBP2P_REQUIREMENT", "SUPPORTED_LIBP2P", "BufferedNoiseReadWriter", "DirectStream",
           "EagerLock", "LeanNoise", "LeanTransportError", "LeanYamux", "check_library", "install",
           "prepare_framed_stream", "require_supported_library"]


def prepare_framed_stream(stream: INetStream) -> DirectStream | None:
    """Put a stream that carries petald's frames on the lean path, once, when it is opened.

    Window credit per half window and an eager state lock on any yamux stream; the direct frame
    path (returned) only on petald's own lean connections, None elsewhere.
    """
    batch_window_updates(stream)
    lean_net_stream(stream)
    return DirectStream.of(stream)
