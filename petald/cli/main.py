"""``petald``: serve blocks, generate through a chain of servers, or run a local demo swarm."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

import click


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that carry a message a person can act on (imported lazily: torch is slow to load)."""
    from petald.kernels.model_source import ModelSourceError
    from petald.kernels.paged_kv_cache import CacheFullError
    from petald.p2pnode.distributed_model import ModelMismatchError
    from petald.p2pnode.remote_span import ServerUnavailable
    from petald.p2pnode.route import NoRouteError
    from petald.protocol.errors import ProtocolError, RemoteError

    return (ModelSourceError, ModelMismatchError, ServerUnavailable, NoRouteError, RemoteError,
            ProtocolError, CacheFullError, ValueError, OSError)


def _run_cli(fn: Callable[[], None], debug: bool) -> None:
    try:
        fn()
    except KeyboardInterrupt:
        click.echo("\npetald: interrupted", err=True)
        sys.exit(130)
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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="petald")
def cli() -> None:
    """petald: run large language models BitTorrent-style."""


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
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), show_default=True)
@click.option("--quant", default="none", type=click.Choice(["none", "int8", "int4", "nf4"]), show_default=True,
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
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(min=0.0),
              help="On SIGTERM, seconds running sessions may go on before they are ended (new ones are refused).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("-v", "--verbose", is_flag=True, help="Log every session.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve(model, blocks, initial_peers, new_swarm, num_blocks, memory_limit, announce_period, rebalance_period,
          network_mbps, listen, identity, device, dtype, quant, max_length, cache_tokens, page_size, idle_timeout,
          step_timeout, session_timeout, shutdown_grace, threads, verbose, debug) -> None:
    """Serve a span of a model's blocks to clients."""
    _setup_logging(verbose)

    def run() -> None:
        import torch

        from petald.p2pnode.serve import ServeOptions, serve
        from petald.p2pnode.server import ServerLimits

        if threads:
            torch.set_num_threads(threads)
        options = ServeOptions(model=model, blocks=blocks, listen=list(listen), identity=identity, device=device,
                               dtype=dtype, quant=quant,
                               limits=ServerLimits(max_length=max_length, cache_tokens=cache_tokens, page_size=page_size,
                                                   idle_timeout=idle_timeout, step_timeout=step_timeout,
                                                   session_timeout=session_timeout,
                                                   open_timeout=min(30.0, idle_timeout)),
                               initial_peers=_addresses(initial_peers), new_swarm=new_swarm,
                               num_blocks=num_blocks, memory_limit_gib=memory_limit,
                               announce_period=announce_period, rebalance_period=rebalance_period,
                               network_mbps=network_mbps, shutdown_grace=shutdown_grace)
        serve(options, announce=lambda text: click.echo(f"petald: {text}"))

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
    """The prompt, then the multiaddrs that followed --peers or --initial-peers unquoted."""
    if not args:
        raise click.UsageError("give a prompt, e.g. petald generate \"Once upon a time\" --initial-peers ADDR")
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
    if not peers and not extra:
        raise click.UsageError("give any node of the swarm with --initial-peers MULTIADDR "
                               "(or the servers themselves with --peers MULTIADDR ...)")
    return prompt, peers + extra, []


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True)
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Any node of the swarm (with /p2p/ID): servers are found through the DHT.")
@click.option("--peers", multiple=True, help="Use exactly these servers, no DHT (multiaddrs with /p2p/ID).")
@click.option("--model", default=None, help="Same model as the servers (default: embedded SmolLM2-135M-Instruct).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 means greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt.")
@click.option("--wire-dtype", default="float32", type=click.Choice(["float32", "float16", "bfloat16"]), show_default=True)
@click.option("--lz4", is_flag=True, help="Compress hidden states on the wire.")
@click.option("--step-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait for a server's answer; a slower server is replaced (the output stays the same).")
@click.option("--recovery-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Seconds to wait for a server to take over blocks nobody serves before giving up.")
@click.option("-v", "--verbose", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def generate(args, initial_peers, peers, model, max_new_tokens, temperature, top_p, seed, chat, wire_dtype, lz4,
             step_timeout, recovery_timeout, verbose, debug) -> None:
    """Generate text from PROMPT through the swarm: petald generate "PROMPT" --initial-peers ADDR"""
    _setup_logging(verbose)
    prompt, direct_peers, swarm_peers = _split_prompt_and_peers(args, peers, initial_peers)

    def run() -> None:
        from petald.p2pnode.distributed_model import DistributedModel

        with DistributedModel(direct_peers, model, initial_peers=swarm_peers, wire_dtype=wire_dtype,
                              codec="lz4" if lz4 else "raw", step_timeout=step_timeout,
                              recovery_timeout=recovery_timeout) as dm:
            if verbose:
                click.echo(f"route: {dm.route().describe()}", err=True)
            generate_text(dm, prompt, max_new_tokens, temperature, top_p, seed, chat)

    _run_cli(run, debug)


@cli.command()
@click.option("--initial-peers", multiple=True, required=True, metavar="MULTIADDR",
              help="Any node of the swarm (with /p2p/ID).")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def swarm(initial_peers, as_json, debug) -> None:
    """Print every model in the swarm: its servers, spans, state, throughput, and uncovered blocks."""
    _setup_logging(False)

    def run() -> None:
        import json

        from petald.p2pnode.identity import load_or_create_identity
        from petald.p2pnode.node_thread import NodeThread
        from petald.p2pnode.swarm_map import format_swarm, read_swarm

        node = NodeThread(load_or_create_identity(None), with_dht=True)
        try:
            async def look() -> list:
                assert node.dht is not None
                await node.dht.join(_addresses(initial_peers))
                return await read_swarm(node.dht)

            models = node.call(look)
        finally:
            node.stop()
        if as_json:
            click.echo(json.dumps({"models": [m.to_json() for m in models]}, indent=2))
        else:
            click.echo(format_swarm(models))

    _run_cli(run, debug)


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
        from petald.kernels.sources import open_source
        from petald.p2pnode.distributed_model import DistributedModel

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
