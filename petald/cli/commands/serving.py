"""``petald serve`` (a span of blocks, and the local API beside them) and ``petald daemon`` (the
local API on a client node that serves no blocks)."""

from __future__ import annotations

import click

from petald.cli.command_errors import run_command
from petald.cli.logs import announcer, setup_logging
from petald.cli.options import (
    addresses,
    announce_option,
    api_listen,
    api_options,
    from_command_line,
    head_quant_option,
    listen_option,
    swarm_key_option,
    swarm_owner_option,
)
from petald.protocol.limits import MAX_RECORD_LIFETIME_S, RECEIVING_FRAMES_BUDGET_BYTES
from petald.vocabulary import DEVICE_CHOICES, DTYPE_NAMES, QUANT_CHOICES


@click.command()
@click.option("--model", default=None, help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M-Instruct).")
@click.option("--blocks", default="auto", show_default=True,
              help="Span of blocks to serve, A:B with B exclusive (e.g. 0:15), or auto: as many as the memory "
                   "budget holds, where the swarm is weakest, moving when the swarm changes.")
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm to join (repeatable; with /p2p/ID).")
@click.option("--new-swarm", is_flag=True, help="Start a new swarm instead of joining one.")
@click.option("--num-blocks", default=None, type=click.IntRange(min=1), help="With --blocks auto: serve this many.")
@click.option("--memory-limit", default=None, type=click.FloatRange(min=0, min_open=True), metavar="GIB",
              help="With --blocks auto: blocks and KV cache must fit in this many GiB (default: half the free memory).")
@click.option("--announce-period", default=30.0, show_default=True,
              type=click.FloatRange(min=0.5, max=MAX_RECORD_LIFETIME_S / 2),
              help="Seconds between republications of this server's signed record (at most half the "
                   f"{MAX_RECORD_LIFETIME_S:.0f} s a record may live).")
@click.option("--rebalance-period", default=60.0, show_default=True, type=click.FloatRange(min=1.0),
              help="With --blocks auto: about how often (seconds, jittered) to check whether to move.")
@click.option("--network-mbps", default=0.0, type=click.FloatRange(min=0.0),
              help="Announced network bandwidth in Mbit/s (0: unknown; petald does not probe the internet).")
@click.option("--reachability", default="auto", show_default=True, type=click.Choice(["auto", "public", "private"]),
              help="auto: peers dial this server back to find out whether others can reach it, and if they "
                   "cannot it serves through a relay. public/private: skip the check (e.g. a port forward).")
@click.option("--no-direct-upgrade", is_flag=True,
              help="Keep relayed connections on the relay: no hole punching (DCUtR) towards a direct one.")
@listen_option("Multiaddr to listen on (repeatable); on 0.0.0.0 or :: this host's interface addresses are "
               "announced, never the wildcard.")
@announce_option()
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 key file; created if missing. Keeps the peer ID stable across restarts.")
@click.option("--device", default="auto", type=click.Choice(DEVICE_CHOICES), show_default=True)
@click.option("--dtype", default="auto", type=click.Choice(["auto", *DTYPE_NAMES]), show_default=True)
@click.option("--quant", default="auto", type=click.Choice(QUANT_CHOICES), show_default=True,
              help="Weight-only quantization: int8 and int4 on CPU; int8 and nf4 on CUDA need bitsandbytes; "
                   "auto measures and takes the fastest with >= 97% top-1 agreement with float32.")
@click.option("--max-length", default=8192, show_default=True, help="Longest session admitted, in tokens.")
@click.option("--cache-tokens", default=1 << 20, show_default=True,
              help="KV cache budget in tokens, summed over blocks and batch rows (a pool of pages allocated at start).")
@click.option("--page-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per KV cache page; a session reserves whole pages up to its max_length.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a session may stay idle between steps before it is closed and its cache freed.")
@click.option("--step-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Seconds one step may compute; a slower step ends its session (its client goes elsewhere).")
@click.option("--session-timeout", default=86400.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a session may last in all.")
@click.option("--adapters", multiple=True, metavar="PATH",
              help="A PEFT LoRA adapter directory to serve (repeatable); clients pick it by the directory's name.")
@click.option("--max-training-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Most tokens (batch x length) in one training forward or backward request; bounds its memory.")
@click.option("--receive-budget", default=RECEIVING_FRAMES_BUDGET_BYTES >> 20, show_default=True,
              type=click.IntRange(min=1), metavar="MIB",
              help="MiB of frames this server holds received in part, all peers together; a stream past it is "
                   "refused (busy).")
@click.option("--peer-sessions", default=32, show_default=True, type=click.IntRange(min=1),
              help="Inference sessions one peer may have open here at once; more are refused (busy).")
@click.option("--peer-cache-share", default=0.5, show_default=True, type=click.FloatRange(min=0.0, min_open=True, max=1.0),
              help="Share of the KV cache one peer's sessions may hold; more is refused (quota).")
@click.option("--peer-steps", default=200.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Steps per second one peer may take (a prefill counts one per 128 tokens); faster ones wait.")
@click.option("--peer-mbps", default=400.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Mbit/s one peer may send this server; faster steps wait.")
@click.option("--peer-training-tokens", default=16384.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Training tokens (batch x length) per second one peer may send; a request that would wait "
                   "longer than 30 s is refused (quota).")
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(min=0.0),
              help="On SIGTERM, seconds running sessions may go on before they are ended (new ones are refused).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@api_options
@click.option("--no-api", is_flag=True, help="Do not serve the local API (e.g. a second server on this machine).")
@head_quant_option()
@swarm_key_option()
@swarm_owner_option()
@click.option("-v", "--verbose", is_flag=True, help="Log every session.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve(model, blocks, initial_peers, new_swarm, num_blocks, memory_limit, announce_period, rebalance_period,
          network_mbps, reachability, no_direct_upgrade, listen, announce, identity, device, dtype, quant, max_length, cache_tokens, page_size, idle_timeout,
          step_timeout, session_timeout, adapters, max_training_tokens, receive_budget, peer_sessions,
          peer_cache_share, peer_steps, peer_mbps, peer_training_tokens, shutdown_grace, threads, socket, socket_group, http,
          api_key, no_api, head_quant, swarm_key, swarm_owner, verbose, debug) -> None:
    """Serve a span of a model's blocks to clients, and the local API on a Unix socket."""
    setup_logging(verbose)
    # Refused only when typed: a config file's top-level head_quant (meant for the daemon) must not
    # stop a server started with --no-api.
    if no_api and head_quant != "none" and from_command_line(click.get_current_context(), "head_quant"):
        raise click.UsageError("--head-quant sets how the local API's model stores its LM head; with --no-api "
                               "there is none: drop one of the two")

    def run() -> None:
        import torch

        from petald.cli.api.daemon import api_beside_server
        from petald.cli.progress import ProgressDisplay
        from petald.p2pnode.server.block_server import ServerLimits
        from petald.p2pnode.server.peer_limits import PeerLimits
        from petald.p2pnode.server.server_node import ServeOptions, serve
        from petald.p2pnode.transport.node_metrics import NodeMetrics

        say = announcer()
        api = None if no_api else api_listen(socket, socket_group, http, "serve", say, api_key)
        if threads:
            torch.set_num_threads(threads)
        progress = ProgressDisplay(say)
        metrics = NodeMetrics()  # the node's: its blocks' and its API's client's, on GET /metrics
        options = ServeOptions(model=model, blocks=blocks, listen=list(listen), announce_addrs=announce,
                               identity=identity, device=device, dtype=dtype, quant=quant, adapters=list(adapters),
                               limits=ServerLimits(max_length=max_length, cache_tokens=cache_tokens, page_size=page_size,
                                                   idle_timeout=idle_timeout, step_timeout=step_timeout,
                                                   session_timeout=session_timeout,
                                                   max_training_tokens=max_training_tokens,
                                                   receive_budget=receive_budget << 20,
                                                   peer=PeerLimits(peer_sessions, peer_cache_share, peer_steps,
                                                                   peer_mbps * 1e6 / 8, peer_training_tokens),
                                                   open_timeout=min(30.0, idle_timeout)),
                               initial_peers=addresses(initial_peers), new_swarm=new_swarm,
                               num_blocks=num_blocks, memory_limit_gib=memory_limit,
                               announce_period=announce_period, rebalance_period=rebalance_period,
                               network_mbps=network_mbps, reachability=reachability, direct_upgrade=not no_direct_upgrade,
                               shutdown_grace=shutdown_grace, swarm_key=swarm_key, swarm_owner=swarm_owner,
                               on_online=api_beside_server(api, model, say, head_quant, metrics, swarm_key),
                               progress=progress, metrics=metrics)
        try:
            serve(options, announce=say)
        finally:
            progress.close()

    run_command(run, debug)


@click.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm to join (repeatable; with /p2p/ID).")
@click.option("--model", default=None, help="The model to generate with (default: embedded SmolLM2-135M-Instruct).")
@listen_option("Multiaddr of this client node (repeatable).")
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 key file; created if missing (default: a new identity each start).")
@api_options
@head_quant_option()
@swarm_key_option()
@swarm_owner_option()
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def daemon(initial_peers, model, listen, identity, socket, socket_group, http, api_key,
           head_quant, swarm_key, swarm_owner, verbose, debug) -> None:
    """Join the swarm as a client (no blocks) and serve the local API until SIGINT or SIGTERM."""
    setup_logging(verbose)

    def run() -> None:
        from petald.cli.api.daemon import DaemonOptions, run_client_daemon
        from petald.kernels.sources.open_source import describe_model, open_source
        from petald.p2pnode.transport.listen_port import refuse_taken_ports

        peers = addresses(initial_peers)
        if not peers:
            raise click.UsageError("a daemon joins a swarm: pass --initial-peers MULTIADDR (any node of the swarm)")
        api = api_listen(socket, socket_group, http, "daemon", api_key=api_key)
        refuse_taken_ports(list(listen))  # before the model is opened
        say = announcer()
        say(f"opening model {describe_model(model)}")
        source = open_source(model)
        run_client_daemon(DaemonOptions(peers, api, list(listen), identity, head_quant, swarm_key, swarm_owner),
                          source, say)

    run_command(run, debug)
