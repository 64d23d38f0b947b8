"""Run a server node until SIGINT or SIGTERM: load the span, start the host, serve."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from petald.kernels.dtypes import dtype_name, resolve_device, resolve_dtype
from petald.kernels.executor import DeviceExecutor
from petald.kernels.quant import check_quant
from petald.kernels.sources import open_source
from petald.kernels.span import BlockSpan
from petald.p2pnode.host import DEFAULT_LISTEN, full_addresses, quiet_libp2p_logs, running_host
from petald.p2pnode.identity import load_or_create_identity
from petald.p2pnode.server import BlockServer, ServerLimits


@dataclass
class ServeOptions:
    model: str | None = None
    blocks: str = "0:"
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    identity: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "none"
    limits: ServerLimits = field(default_factory=ServerLimits)


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int]:
    """``A:B`` (B exclusive), ``A:`` for the rest, ``:B`` from the start."""
    start_text, sep, end_text = text.partition(":")
    try:
        start = int(start_text) if start_text else 0
        end = int(end_text) if end_text else num_blocks
    except ValueError:
        raise ValueError(f"--blocks {text!r}: expected A:B with integers, e.g. 0:15") from None
    if not sep or not 0 <= start < end <= num_blocks:
        raise ValueError(f"--blocks {text!r}: need 0 <= A < B <= {num_blocks} (this model has {num_blocks} blocks)")
    return start, end


def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> None:
    """Load, listen, serve; return after a signal once everything is closed."""
    quiet_libp2p_logs()
    announce(f"opening model {options.model or 'smollm2 (embedded default)'}")
    source = open_source(options.model)
    start, end = parse_blocks(options.blocks, source.identity.num_blocks)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    check_quant(options.quant, device)  # before loading anything
    key_pair = load_or_create_identity(options.identity)

    step = max(1, (end - start) // 5)  # about five progress lines, whatever the span

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            announce(f"loading blocks {start}:{end} of {source.identity.model_id}: {done}/{total} "
                     f"({100 * done // total}%)")

    span = BlockSpan(source, start, end, dtype, device, progress=progress, quant=options.quant)
    executor = DeviceExecutor(span)
    server = BlockServer(source.identity, span, executor, options.limits)
    try:
        trio.run(_serve_until_signal, server, key_pair, options.listen, announce)
    finally:
        executor.shutdown()
    announce(f"stopped (served blocks {start}:{end}, {dtype_name(dtype)} on {device})")


async def _serve_until_signal(server: BlockServer, key_pair, listen: list[str], announce) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_host(key_pair, listen) as host:
            server.register(host)
            span = server.span
            addresses = full_addresses(host)
            if not addresses:
                # py-libp2p logs a failed bind (e.g. a port in use) and carries on without listening.
                raise OSError(f"could not listen on {', '.join(listen)}: is the port in use, or the address not local?")
            for address in addresses:
                announce(f"serving blocks {span.start}:{span.end} of {server.identity.model_id} "
                         f"({dtype_name(span.dtype)}, quant {span.quant}, {span.device}) at {address}")
            async for signum in signals:
                announce(f"received {signal.Signals(signum).name}, shutting down")
                break
