"""``petald``: serve blocks, generate through a chain of servers, or run a local demo swarm."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from petald.vocabulary import DEVICE_CHOICES, DTYPE_NAMES, HEAD_QUANT_MODES, QUANT_MODES


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that carry a message a person can act on (imported lazily: torch is slow to load)."""
    from petald.cli.api.daemon_client import DaemonError
    from petald.kernels.paged_kv_cache import CacheFullError
    from petald.kernels.sources.model_source import ModelSourceError
    from petald.p2pnode.client.distributed_model import ModelMismatchError
    from petald.p2pnode.routing.route import NoRouteError
    from petald.p2pnode.transport.peer_streams import ServerUnavailable
    from petald.protocol.errors import ProtocolError, RemoteError

    return (ModelSourceError, ModelMismatchError, ServerUnavailable, NoRouteError, RemoteError,
            ProtocolError, CacheFullError, DaemonError, ValueError, OSError)


def _run_cli(fn: Callable[[], None], debug: bool) -> None:
    try:
        fn()
    except KeyboardInterrupt:
        click.echo("\npetald: interrupted", err=True)
        sys.exit(130)
    except click.ClickException:
        raise  # click prints it as a usage error or a sentence
    except Exception as exc:
        if debug:
            raise
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # trio nurseries wrap a single failure in a group
        known = isinstance(exc, _known_errors())
        prefix = "error" if known else f"unexpected {type(exc).__name__}"
        click.echo(f"petald: {prefix}: {exc}", err=True)
        if not known:
            click.echo("petald: run again with --debug for the full traceback", err=True)
        sys.exit(1)


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # journald stamps every line itself; elsewhere a log line carries its own time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{stamp}%(levelname)s %(name)s: %(message)s")


def _announcer() -> Callable[[str], None]:
    """Print ``petald: TEXT`` and tell systemd (STATUS=, shown by systemctl status)."""
    from petald.cli.systemd import notify as systemd_notify

    def say(text: str) -> None:
        click.echo(f"petald: {text}")
        systemd_notify.status(text)

    return say


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="petald")
@click.option("--config", "config_file", default=None, metavar="PATH",
              help="TOML config file (default: $PETALD_CONFIG, else $XDG_CONFIG_HOME/petald/config.toml, "
                   "else ~/.config/petald/config.toml). Precedence: flags > PETALD_* environment > file > defaults.")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """petald: run large language models BitTorrent-style."""
    from petald.cli.config import config_path, default_map, read_config_file, resolve_settings

    path, required = config_path(config_file)
    assert isinstance(ctx.command, click.Group)
    settings = resolve_settings(ctx.command, read_config_file(path, required), path)
    ctx.default_map = default_map(ctx.command, settings)
    ctx.meta["petald.config"] = (path, settings)


def _head_quant_option() -> Callable:
    return click.option("--head-quant", default="none", show_default=True, type=click.Choice(HEAD_QUANT_MODES),
                        help="How the local LM head is stored: bf16 is faster on CPUs with native bfloat16 "
                             "(AVX512-BF16, AMX); none (float32) is the reference.")


def _api_options(fn: Callable) -> Callable:
    """--socket, --socket-group and --http, shared by serve and daemon."""
    fn = click.option("--http", default=None, metavar="HOST:PORT",
                      help="Also serve the API on TCP (e.g. 127.0.0.1:8080). It has no authentication.")(fn)
    fn = click.option("--socket-group", default=None, metavar="GROUP",
                      help="Let this group use the API socket too (mode 0660 instead of 0600).")(fn)
    fn = click.option("--socket", default=None, metavar="PATH",
                      help="Unix socket of the local API (default: $XDG_RUNTIME_DIR/petald/api.sock, "
                           "else ~/.petald/api.sock).")(fn)
    return fn


def _socket_path(socket: str | None) -> Path:
    from petald.cli.api.unix_socket import default_socket_path

    return Path(socket).expanduser() if socket else default_socket_path()


def _api_listen(socket: str | None, socket_group: str | None, http: str | None):
    """Where the API listens; fails now, before any model is loaded, if the socket is taken."""
    from petald.cli.api.server import ApiListen, parse_http_address
    from petald.cli.api.unix_socket import check_socket_free

    path = _socket_path(socket)
    check_socket_free(path)
    if http is not None:
        parse_http_address(http)
    return ApiListen(path, http, socket_group)


@cli.command()
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
@click.option("--announce-period", default=30.0, show_default=True, type=click.FloatRange(min=0.5),
              help="Seconds between republications of this server's signed record.")
@click.option("--rebalance-period", default=60.0, show_default=True, type=click.FloatRange(min=1.0),
              help="With --blocks auto: about how often (seconds, jittered) to check whether to move.")
@click.option("--network-mbps", default=0.0, type=click.FloatRange(min=0.0),
              help="Announced network bandwidth in Mbit/s (0: unknown; petald does not probe the internet).")
@click.option("--listen", multiple=True, default=["/ip4/127.0.0.1/tcp/0"], show_default=True,
              help="Multiaddr to listen on (repeatable).")
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 key file; created if missing. Keeps the peer ID stable across restarts.")
@click.option("--device", default="auto", type=click.Choice(DEVICE_CHOICES), show_default=True)
@click.option("--dtype", default="auto", type=click.Choice(["auto", *DTYPE_NAMES]), show_default=True)
@click.option("--quant", default="none", type=click.Choice(QUANT_MODES), show_default=True,
              help="Weight-only quantization: int8 and int4 on CPU; int8 and nf4 on CUDA need bitsandbytes.")
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
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(min=0.0),
              help="On SIGTERM, seconds running sessions may go on before they are ended (new ones are refused).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@_api_options
@click.option("--no-api", is_flag=True, help="Do not serve the local API (e.g. a second server on this machine).")
@_head_quant_option()
@click.option("-v", "--verbose", is_flag=True, help="Log every session.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve(model, blocks, initial_peers, new_swarm, num_blocks, memory_limit, announce_period, rebalance_period,
          network_mbps, listen, identity, device, dtype, quant, max_length, cache_tokens, page_size, idle_timeout,
          step_timeout, session_timeout, adapters, max_training_tokens, shutdown_grace, threads, socket, socket_group, http,
          no_api, head_quant, verbose, debug) -> None:
    """Serve a span of a model's blocks to clients, and the local API on a Unix socket."""
    _setup_logging(verbose)
    # Refused only when typed: a config file's top-level head_quant (meant for the daemon) must not
    # stop a server started with --no-api.
    if no_api and head_quant != "none" and _from_command_line(click.get_current_context(), "head_quant"):
        raise click.UsageError("--head-quant sets how the local API's model stores its LM head; with --no-api "
                               "there is none: drop one of the two")

    def run() -> None:
        import torch

        from petald.cli.api.daemon import api_beside_server
        from petald.cli.progress import ProgressDisplay
        from petald.p2pnode.server.block_server import ServerLimits
        from petald.p2pnode.server.server_node import ServeOptions, serve

        api = None if no_api else _api_listen(socket, socket_group, http)
        if threads:
            torch.set_num_threads(threads)
        say = _announcer()
        progress = ProgressDisplay(say)
        options = ServeOptions(model=model, blocks=blocks, listen=list(listen), identity=identity, device=device,
                               dtype=dtype, quant=quant, adapters=list(adapters),
                               limits=ServerLimits(max_length=max_length, cache_tokens=cache_tokens, page_size=page_size,
                                                   idle_timeout=idle_timeout, step_timeout=step_timeout,
                                                   session_timeout=session_timeout,
                                                   max_training_tokens=max_training_tokens,
                                                   open_timeout=min(30.0, idle_timeout)),
                               initial_peers=_addresses(initial_peers), new_swarm=new_swarm,
                               num_blocks=num_blocks, memory_limit_gib=memory_limit,
                               announce_period=announce_period, rebalance_period=rebalance_period,
                               network_mbps=network_mbps, shutdown_grace=shutdown_grace,
                               on_online=api_beside_server(api, model, say, head_quant),
                               progress=progress)
        try:
            serve(options, announce=say)
        finally:
            progress.close()

    _run_cli(run, debug)


class TokenPrinter:
    """Prints text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def generate_text(model, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int | None, chat: bool, out=sys.stdout) -> list[int]:
    """Tokenize, generate through ``model`` (a DistributedModel), stream text to ``out``."""
    tokenizer = model.tokenizer
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    printer = TokenPrinter(tokenizer, out)
    eos = {t for t in (model.config.eos_token_id, tokenizer.eos_token_id) if t is not None}
    result = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature, top_p=top_p, seed=seed, eos_token_id=sorted(eos),
                            streamer=printer)
    out.write("\n")
    out.flush()
    return result[0, ids.shape[1]:].tolist()


def _addresses(values: Sequence[str]) -> list[str]:
    """Multiaddrs from repeated options, each of which may hold several (space or comma separated)."""
    return [a for value in values for a in value.replace(",", " ").split()]


def _split_prompt_and_peers(args: Sequence[str], peers: Sequence[str], initial_peers: Sequence[str]
                            ) -> tuple[str, list[str], list[str]]:
    """The prompt, then the multiaddrs that followed --peers or --initial-peers unquoted
    (both lists empty: no swarm given, use the local daemon)."""
    if not args:
        raise click.UsageError("give a prompt, e.g. petald generate \"Once upon a time\"")
    prompt, extra = args[0], list(args[1:])
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    bad = [a for a in extra if not a.startswith("/")]
    if bad:
        raise click.UsageError(f"unexpected arguments {bad}: quote the prompt, and give peers as multiaddrs")
    peers, initial_peers = _addresses(peers), _addresses(initial_peers)
    if peers and initial_peers:
        raise click.UsageError("give either --initial-peers (find servers in the swarm) or --peers (use exactly "
                               "these servers), not both")
    if initial_peers:
        return prompt, [], initial_peers + extra
    return prompt, peers + extra, []


def _from_command_line(ctx: click.Context, *names: str) -> bool:
    return any(ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE for n in names)


def _pick_daemon(ctx: click.Context, use_daemon: bool | None, socket: str | None, swarm_given: bool):
    """The local daemon's client when this command should use it, else None.

    Unless told (--daemon / --no-daemon), the daemon is used when it answers and no swarm was
    named on the command line (--peers and --initial-peers mean: be a client node of your own).
    """
    from petald.cli.api.daemon_client import DaemonClient

    path = _socket_path(socket)
    if use_daemon is False or (use_daemon is None and swarm_given):
        return None
    client = DaemonClient.running_at(path)
    if client is None and use_daemon:
        raise click.ClickException(f"no petald daemon answers on {path}: start one (petald serve, petald daemon) "
                                   "or leave out --daemon")
    if client is not None:
        click.echo(f"petald: using the local daemon at {path}", err=True)
    return client


def _no_swarm_error(socket: str | None) -> click.UsageError:
    return click.UsageError(f"no local daemon answers on {_socket_path(socket)}, and no swarm was given: give any "
                            "node of the swarm with --initial-peers MULTIADDR (or the servers themselves with "
                            "--peers MULTIADDR ...), or start a daemon (petald serve / petald daemon)")


def _client_node(peers: list[str], initial_peers: list[str], model: str | None, socket: str | None,
                 wire_dtype: str, lz4: bool, step_timeout: float, recovery_timeout: float, adapter: str | None,
                 head_quant: str):
    """A client node of this command's own (no daemon): the servers given, or the swarm's."""
    if not peers and not initial_peers:
        raise _no_swarm_error(socket)
    from petald.p2pnode.client.distributed_model import DistributedModel

    return DistributedModel(peers, model, initial_peers=initial_peers, wire_dtype=wire_dtype,
                            codec="lz4" if lz4 else "raw", step_timeout=step_timeout,
                            recovery_timeout=recovery_timeout, adapter=adapter, head_quant=head_quant)


def _refuse_client_node_options(adapter: str | None, head_quant: str) -> None:
    """Options that only a client node of this command's own can apply (the daemon holds its own model)."""
    if adapter:
        raise click.UsageError("--adapter needs a client node of this command's own: give the swarm with "
                               "--initial-peers (or --peers); the local API does not select adapters")
    if head_quant != "none":
        raise click.UsageError("--head-quant applies to a client node of this command's own: give the swarm "
                               "with --initial-peers (or --peers), or start the daemon with --head-quant")


def _daemon_model_name(model: str | None) -> str | None:
    """The model id to ask the daemon for: None (whatever it serves) unless --model was given."""
    if model is None:
        return None
    from petald.kernels.sources.open_source import open_source

    return open_source(model).identity.model_id


def _client_options(fn: Callable) -> Callable:
    """Options shared by generate and chat."""
    for decorator in reversed([
        click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
                     help="Any node of the swarm (with /p2p/ID): servers are found through the DHT."),
        click.option("--peers", multiple=True, help="Use exactly these servers, no DHT (multiaddrs with /p2p/ID)."),
        click.option("--model", default=None,
                     help="Same model as the servers (default: embedded SmolLM2-135M-Instruct; through the "
                          "daemon: the daemon's model)."),
        click.option("--daemon/--no-daemon", "use_daemon", default=None,
                     help="Use the local daemon (default: when it answers and no swarm is named here), or never."),
        click.option("--socket", default=None, metavar="PATH", help="The local daemon's API socket."),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 2.0),
                     help="0 means greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True)),
        click.option("--seed", default=None, type=int),
        click.option("--wire-dtype", default="float32", type=click.Choice(DTYPE_NAMES),
                     show_default=True),
        click.option("--lz4", is_flag=True, help="Compress hidden states on the wire."),
        click.option("--step-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
                     help="Seconds to wait for a server's answer; a slower server is replaced (the output "
                          "stays the same)."),
        click.option("--recovery-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="Seconds to wait for a server to take over blocks nobody serves before giving up."),
        click.option("--adapter", default=None, metavar="NAME",
                     help="Run every block with this LoRA adapter, on servers that hold it (see petald swarm)."),
        _head_quant_option(),
        click.option("-v", "--verbose", is_flag=True),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]):
        fn = decorator(fn)
    return fn


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt.")
@_client_options
@click.pass_context
def generate(ctx, args, max_new_tokens, chat, initial_peers, peers, model, use_daemon, socket, temperature, top_p,
             seed, wire_dtype, lz4, step_timeout, recovery_timeout, adapter, head_quant, verbose, debug) -> None:
    """Generate text from PROMPT: through the local daemon when one runs, else as a client node of its
    own (petald generate "PROMPT" --initial-peers ADDR)."""
    _setup_logging(verbose)
    prompt, direct_peers, swarm_peers = _split_prompt_and_peers(args, peers, initial_peers)

    def run() -> None:
        daemon = _pick_daemon(ctx, use_daemon, socket,
                              _from_command_line(ctx, "peers", "initial_peers") or bool(args[1:]))
        if daemon is not None:
            _refuse_client_node_options(adapter, head_quant)
            with daemon:
                body = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
                if seed is not None:
                    body["seed"] = seed
                name = _daemon_model_name(model) if _from_command_line(ctx, "model") else None
                if name is not None:
                    body["model"] = name
                if chat:
                    pieces = daemon.stream("/v1/chat/completions",
                                           {**body, "messages": [{"role": "user", "content": prompt}]})
                else:
                    pieces = daemon.stream("/v1/completions", {**body, "prompt": prompt})
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            return
        with _client_node(direct_peers, swarm_peers, model, socket, wire_dtype, lz4, step_timeout,
                          recovery_timeout, adapter, head_quant) as dm:
            if verbose:
                click.echo(f"route: {dm.route().describe()}", err=True)
            generate_text(dm, prompt, max_new_tokens, temperature, top_p, seed, chat)

    _run_cli(run, debug)


@cli.command()
@click.option("--system-prompt", default=None, metavar="TEXT", help="A system message to start with.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Longest answer, in tokens.")
@_client_options
@click.pass_context
def chat(ctx, system_prompt, max_new_tokens, initial_peers, peers, model, use_daemon, socket, temperature, top_p,
         seed, wire_dtype, lz4, step_timeout, recovery_timeout, adapter, head_quant, verbose, debug) -> None:
    """Chat with the model, a line at a time: through the local daemon when one runs, else as a
    client node of its own. /reset forgets the conversation; /exit or Ctrl-D ends it."""
    _setup_logging(verbose)
    peers, initial_peers = _addresses(peers), _addresses(initial_peers)
    if peers and initial_peers:
        raise click.UsageError("give either --initial-peers or --peers, not both")

    def run() -> None:
        from petald.cli.chat import Sampling, reply_through_daemon, reply_through_model, run_chat

        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        daemon = _pick_daemon(ctx, use_daemon, socket, _from_command_line(ctx, "peers", "initial_peers"))
        if daemon is not None:
            _refuse_client_node_options(adapter, head_quant)
            with daemon:
                name = _daemon_model_name(model) if _from_command_line(ctx, "model") else None
                run_chat(reply_through_daemon(daemon, name), sampling, system_prompt)
            return
        with _client_node(peers, initial_peers, model, socket, wire_dtype, lz4, step_timeout,
                          recovery_timeout, adapter, head_quant) as dm:
            run_chat(reply_through_model(dm), sampling, system_prompt)

    _run_cli(run, debug)


@cli.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm (with /p2p/ID); without it, ask the local daemon.")
@click.option("--socket", default=None, metavar="PATH", help="The local daemon's API socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def swarm(initial_peers, socket, as_json, debug) -> None:
    """Print every model in the swarm: its servers, spans, state, throughput, and uncovered blocks."""
    _setup_logging(False)

    def run() -> None:
        import json

        from petald.cli.swarm_table import format_swarm_table

        if initial_peers:
            maps = _read_swarm_here(_addresses(initial_peers))
        else:
            from petald.cli.api.daemon_client import DaemonClient

            daemon = DaemonClient.running_at(_socket_path(socket))
            if daemon is None:
                raise click.UsageError(f"no local daemon answers on {_socket_path(socket)}: give any node of the "
                                       "swarm with --initial-peers MULTIADDR")
            with daemon:
                maps = daemon.swarm()
        if as_json:
            click.echo(json.dumps({"models": maps}, indent=2))
        else:
            click.echo(format_swarm_table(maps))

    _run_cli(run, debug)


def _read_swarm_here(initial_peers: list[str]) -> list[dict]:
    """The swarm map (JSON form) read by a short-lived client node of this process."""
    from petald.p2pnode.client.node_thread import NodeThread
    from petald.p2pnode.swarm.swarm_map import read_swarm
    from petald.p2pnode.transport.identity import load_or_create_identity

    node = NodeThread(load_or_create_identity(None), with_dht=True)
    try:
        async def look() -> list:
            assert node.dht is not None
            await node.dht.join(initial_peers)
            return await read_swarm(node.dht)

        models = node.call(look)
    finally:
        node.stop()
    return [m.to_json() for m in models]


@cli.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm to join (repeatable; with /p2p/ID).")
@click.option("--model", default=None, help="The model to generate with (default: embedded SmolLM2-135M-Instruct).")
@click.option("--listen", multiple=True, default=["/ip4/127.0.0.1/tcp/0"], show_default=True,
              help="Multiaddr of this client node (repeatable).")
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 key file; created if missing (default: a new identity each start).")
@_api_options
@_head_quant_option()
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def daemon(initial_peers, model, listen, identity, socket, socket_group, http, head_quant, verbose, debug) -> None:
    """Join the swarm as a client (no blocks) and serve the local API until SIGINT or SIGTERM."""
    _setup_logging(verbose)

    def run() -> None:
        from petald.cli.api.daemon import DaemonOptions, run_client_daemon
        from petald.kernels.sources.open_source import open_source

        peers = _addresses(initial_peers)
        if not peers:
            raise click.UsageError("a daemon joins a swarm: pass --initial-peers MULTIADDR (any node of the swarm)")
        api = _api_listen(socket, socket_group, http)
        say = _announcer()
        say(f"opening model {model or 'smollm2 (embedded default)'}")
        source = open_source(model)
        run_client_daemon(DaemonOptions(peers, api, list(listen), identity, head_quant), source, say)

    _run_cli(run, debug)


@cli.group()
def config() -> None:
    """The effective configuration: flags > PETALD_* environment > config file > defaults."""


@config.command("show")
@click.argument("command", required=False)
@click.pass_context
def config_show(ctx, command) -> None:
    """Print the effective configuration (of COMMAND, or of every command) as TOML, each value
    with where it came from."""
    from petald.cli.config import configurable_commands, describe_effective

    path, settings = ctx.find_root().meta["petald.config"]
    root = ctx.find_root().command
    assert isinstance(root, click.Group)
    if command is not None and command not in configurable_commands(root):
        raise click.UsageError(f"no command {command!r}; commands: {', '.join(configurable_commands(root))}")
    click.echo(describe_effective(root, settings, path, path.exists(), command), nl=False)


@cli.command("install-service", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--system", is_flag=True, help="A system unit in /etc/systemd/system (run as root) instead of a "
                                              "user unit in ~/.config/systemd/user.")
@click.option("--user", "run_as", default=None, help="With --system: the account petald runs as (default: you).")
@click.option("--name", default="petald.service", show_default=True, help="Unit name (one per server).")
@click.option("--print", "print_only", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="Write the unit here instead.")
def install_service(args, system, run_as, name, print_only, output) -> None:
    """Write a systemd unit that runs `petald serve ARGS` (or `petald daemon ARGS`), e.g.
    petald install-service -- --initial-peers ADDR --blocks auto"""
    from petald.cli.systemd.unit import unit_path, unit_text

    if not name.endswith(".service"):
        name += ".service"
    text = unit_text(list(args), system, run_as)
    if print_only:
        click.echo(text, nl=False)
        return
    path = Path(output) if output else unit_path(system, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except PermissionError:
        raise click.ClickException(f"cannot write {path}: run as root for --system, or use --output") from None
    click.echo(f"petald: wrote {path}")
    manager = "systemctl" if system else "systemctl --user"
    click.echo(f"petald: start it with: {manager} daemon-reload && {manager} enable --now {name}")
    click.echo(f"petald: its log: journalctl {'' if system else '--user '}-u {name} -f")
    if not system:
        click.echo("petald: to keep it running after you log out: loginctl enable-linger")


@cli.command()
@click.argument("prompt", default="What is the capital of France?")
@click.option("--servers", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option("--model", default=None, help="Default: embedded SmolLM2-135M-Instruct.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--debug", is_flag=True)
def demo(prompt, servers, model, max_new_tokens, debug) -> None:
    """Start a local swarm of SERVERS processes on 127.0.0.1 and chat through it."""
    _setup_logging(False)

    def run() -> None:
        from petald.cli.local_swarm import LocalSwarm, even_spans
        from petald.kernels.sources.open_source import open_source
        from petald.p2pnode.client.distributed_model import DistributedModel

        source = open_source(model)
        spans = even_spans(source.identity.num_blocks, servers)
        click.echo(f"petald demo: starting {servers} servers for {source.identity.model_id}: {', '.join(spans)}")
        with LocalSwarm(spans, model, log=lambda t: click.echo(f"petald demo: {t}")) as local:
            click.echo(f"petald demo: finding the servers through the DHT from {local.addresses[0]}")
            with DistributedModel(model=source, initial_peers=local.addresses[:1]) as dm:
                click.echo(f"petald demo: route {dm.route().describe()}")
                click.echo(f"\n>>> {prompt}\n")
                generate_text(dm, prompt, max_new_tokens, 0.0, 1.0, None, chat=True)
        click.echo("petald demo: servers stopped")

    _run_cli(run, debug)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
