"""Yamux window credit once per half window on petald's own streams, not after every read."""

from __future__ import annotations

from libp2p.abc import INetStream


def batch_window_updates(stream: INetStream) -> None:
    """Make this stream's yamux credit the peer once per half window, not after every read.

    py-libp2p 0.8's YamuxStream sends a WINDOW_UPDATE frame after nearly every read(),
    so each small request/response costs two extra encrypted frames, syscalls and
    wake-ups on both sides (about 40% of a hop's CPU, see docs/benchmarks.md). We wrap
    the method on this stream instance only: other protocols keep the library's
    behaviour, and peers see ordinary (larger, rarer) window updates. The library's
    own auto-tuning still runs on every credit we do pass on.
    """
    muxed = getattr(stream, "muxed_stream", None)
    original = getattr(muxed, "_auto_tune_and_send_window_update", None)
    window = getattr(muxed, "target_recv_window", None)
    if original is None or not isinstance(window, int):
        return  # another muxer: keep its behaviour
    owed = 0

    async def credit_every_half_window(*, bytes_read: int = 0) -> None:
        nonlocal owed
        owed += bytes_read
        if owed < muxed.target_recv_window // 2:
            return
        credit, owed = owed, 0
        await original(bytes_read=credit)

    muxed._auto_tune_and_send_window_update = credit_every_half_window
