"""``petald generate`` and ``petald chat``: through the local daemon when one answers and no swarm
is named, else as a client node of this command's own (a DistributedModel in this process)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import click

from petald.cli.command_errors import run_command
from petald.cli.logs import setup_logging
from petald.cli.options import (
    addresses,
    from_command_line,
    head_quant_option,
    socket_path,
    swarm_key_option,
    swarm_owner_option,
)
from petald.vocabulary import DTYPE_NAMES, WIRE_CHOICES

if TYPE_CHECKING:
    from petald.cli.api.daemon_client import DaemonClient
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.transport.swarm_key import SwarmKey


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
        click.option("--wire", default="auto", show_default=True, type=click.Choice(WIRE_CHOICES),
                     help="How hidden states travel: auto picks 16-bit per hop, or int8 where the link is slow "
                          "for its round trip; float32 is exact (docs/protocol.md, \"Wire formats\")."),
        click.option("--wire-dtype", default=None, type=click.Choice(DTYPE_NAMES), hidden=True,
                     help="The old name of --wire."),
        click.option("--lz4", is_flag=True, hidden=True, help="Removed: lz4 does not shrink hidden states."),
        click.option("--step-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
                     help="Seconds to wait for a server's answer; a slower server is replaced (the output "
                          "stays the same)."),
        click.option("--recovery-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="Seconds to wait for a server to take over blocks nobody serves before giving up."),
        click.option("--adapter", default=None, metavar="NAME",
                     help="Run every block with this LoRA adapter, on servers that hold it (see petald swarm)."),
        head_quant_option(),
        swarm_key_option(),
        swarm_owner_option(),
        click.option("--identity", default=None, type=click.Path(dir_okay=False),
                     help="Ed25519 key file of this client node; created if missing (default: a new identity "
                          "each run). A stable peer ID, which a swarm's member list can name."),
        click.option("-v", "--verbose", is_flag=True),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]):
        fn = decorator(fn)
    return fn


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt.")
@click.option("--stats", is_flag=True, help="Then print on stderr: tokens, tokens/s, time to first token, route "
                                            "(-v does too).")
@_client_options
@click.pass_context
def generate(ctx, args, max_new_tokens, chat, stats, initial_peers, peers, model, use_daemon, socket, temperature, top_p,
             seed, wire, wire_dtype, lz4, step_timeout, recovery_timeout, adapter, head_quant, swarm_key, swarm_owner,
             identity, verbose, debug) -> None:
    """Generate text from PROMPT: through the local daemon when one runs, else as a client node of its
    own (petald generate "PROMPT" --initial-peers ADDR)."""
    setup_logging(verbose)
    prompt, direct_peers, swarm_peers = _split_prompt_and_peers(args, peers, initial_peers)
    wire = _wire_choice(ctx, wire, wire_dtype, lz4)

    def run() -> None:
        from petald.cli.text_generation import (
            GenerationStats,
            Sampling,
            daemon_request,
            generate_text,
            print_daemon_stream,
            show,
        )

        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        figures = GenerationStats() if stats or verbose else None
        daemon = _pick_daemon(ctx, use_daemon, socket,
                              from_command_line(ctx, "peers", "initial_peers") or bool(args[1:]))
        if daemon is not None:
            _refuse_client_node_options(adapter, head_quant, wire)
            with daemon:
                body = daemon_request(sampling, _daemon_model_name(ctx, model))
                if chat:
                    print_daemon_stream(daemon, "/v1/chat/completions",
                                        {**body, "messages": [{"role": "user", "content": prompt}]}, sys.stdout,
                                        figures)
                else:
                    print_daemon_stream(daemon, "/v1/completions", {**body, "prompt": prompt}, sys.stdout, figures)
                show(sys.stdout, "\n")
            if figures is not None:
                click.echo(figures.summary(), err=True)
            return
        with _client_node(direct_peers, swarm_peers, model, socket, wire, step_timeout,
                          recovery_timeout, adapter, head_quant, max_new_tokens,
                          (swarm_key, swarm_owner, identity)) as dm:
            if figures is not None:
                figures.started = time.perf_counter()  # the generation's time, not the swarm's joining
            generate_text(dm, prompt, sampling, chat, stats=figures)
        if figures is not None:
            click.echo(figures.summary(), err=True)

    run_command(run, debug)


@click.command()
@click.option("--system-prompt", default=None, metavar="TEXT", help="A system message to start with.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Longest answer, in tokens.")
@_client_options
@click.pass_context
def chat(ctx, system_prompt, max_new_tokens, initial_peers, peers, model, use_daemon, socket, temperature, top_p,
         seed, wire, wire_dtype, lz4, step_timeout, recovery_timeout, adapter, head_quant, swarm_key, swarm_owner,
         identity, verbose, debug) -> None:
    """Chat with the model, a line at a time: through the local daemon when one runs, else as a
    client node of its own. /reset forgets the conversation; /exit or Ctrl-D ends it."""
    setup_logging(verbose)
    peers, initial_peers = _one_way_to_the_swarm(peers, initial_peers,
                                                 "give either --initial-peers or --peers, not both")
    wire = _wire_choice(ctx, wire, wire_dtype, lz4)

    def run() -> None:
        from petald.cli.chat import reply_through_daemon, reply_through_model, run_chat
        from petald.cli.text_generation import Sampling

        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        daemon = _pick_daemon(ctx, use_daemon, socket, from_command_line(ctx, "peers", "initial_peers"))
        if daemon is not None:
            _refuse_client_node_options(adapter, head_quant, wire)
            with daemon:
                run_chat(reply_through_daemon(daemon, _daemon_model_name(ctx, model)), sampling, system_prompt)
            return
        with _client_node(peers, initial_peers, model, socket, wire, step_timeout,
                          recovery_timeout, adapter, head_quant, max_new_tokens,
                          (swarm_key, swarm_owner, identity)) as dm:
            run_chat(reply_through_model(dm), sampling, system_prompt)

    run_command(run, debug)


def _one_way_to_the_swarm(peers: Sequence[str], initial_peers: Sequence[str], both_given: str
                          ) -> tuple[list[str], list[str]]:
    """The multiaddrs of --peers and of --initial-peers; ``both_given``: the refusal when both are."""
    peers, initial_peers = addresses(peers), addresses(initial_peers)
    if peers and initial_peers:
        raise click.UsageError(both_given)
    return peers, initial_peers


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
    peers, initial_peers = _one_way_to_the_swarm(
        peers, initial_peers,
        "give either --initial-peers (find servers in the swarm) or --peers (use exactly these servers), not both")
    if initial_peers:
        return prompt, [], initial_peers + extra
    return prompt, peers + extra, []


def _pick_daemon(ctx: click.Context, use_daemon: bool | None, socket: str | None,
                 swarm_given: bool) -> DaemonClient | None:
    """The local daemon's client when this command should use it, else None.

    Unless told (--daemon / --no-daemon), the daemon is used when it answers and no swarm was
    named on the command line (--peers and --initial-peers mean: be a client node of your own).
    """
    from petald.cli.api.daemon_client import DaemonClient

    path = socket_path(socket)
    if use_daemon is False or (use_daemon is None and swarm_given):
        return None
    client = DaemonClient.running_at(path)
    if client is None and use_daemon:
        raise click.ClickException(f"no petald daemon answers on {path}: start one (petald serve, petald daemon) "
                                   "or leave out --daemon")
    if client is not None:
        click.echo(f"petald: using the local daemon at {path}", err=True)
    return client


def _client_node(peers: list[str], initial_peers: list[str], model: str | None, socket: str | None,
                 wire: str, step_timeout: float, recovery_timeout: float, adapter: str | None,
                 head_quant: str, max_new_tokens: int, access: tuple[SwarmKey | None, str | None, str | None]
                 ) -> DistributedModel:
    """A client node of this command's own (no daemon): the servers given, or the swarm's.
    ``access``: --swarm-key, --swarm-owner and --identity (a private swarm's key, its owner, this node's key).
    ``max_new_tokens`` beyond the model's context is refused before joining the swarm."""
    if not peers and not initial_peers:
        raise click.UsageError(f"no local daemon answers on {socket_path(socket)}, and no swarm was given: give "
                               "any node of the swarm with --initial-peers MULTIADDR (or the servers themselves "
                               "with --peers MULTIADDR ...), or start a daemon (petald serve / petald daemon)")
    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.client.request_checks import context_length

    source = open_source(model)
    context = context_length(source.config)
    if max_new_tokens >= context:  # a prompt holds one token at least
        raise click.UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's "
                               f"context is {context} tokens; give at most {context - 1}")
    hinted = []

    def say(text: str) -> None:
        """What the client does before its first token, said while it happens (stdout stays the text);
        the first time, with the fast path."""
        hint = "" if hinted else " (a daemon stays joined, so commands start at once: petald daemon --initial-peers ADDR)"
        hinted.append(text)
        click.echo(f"petald: {text}...{hint}", err=True)

    return DistributedModel(peers, source, initial_peers=initial_peers, progress=say, wire=wire,
                            step_timeout=step_timeout,
                            recovery_timeout=recovery_timeout, adapter=adapter, head_quant=head_quant,
                            swarm_key=access[0], swarm_owner=access[1], identity_file=access[2])


def _wire_choice(ctx: click.Context, wire: str, wire_dtype: str | None, lz4: bool) -> str:
    """--wire, or its old name --wire-dtype; refused together when they disagree, and --lz4 refused."""
    if lz4:
        raise click.UsageError("--lz4 is gone: measured on real hidden states it made them 0.4% larger, not "
                               "smaller; use --wire int8 to halve the bytes of the 16-bit default")
    if wire_dtype is None:
        return wire
    if from_command_line(ctx, "wire") and wire != wire_dtype:
        raise click.UsageError(f"--wire-dtype {wire_dtype} contradicts --wire {wire}: give --wire alone "
                               "(--wire-dtype is its old name)")
    return wire_dtype


def _refuse_client_node_options(adapter: str | None, head_quant: str, wire: str) -> None:
    """Options that only a client node of this command's own can apply (the daemon holds its own model)."""
    if wire != "auto":
        raise click.UsageError("--wire applies to a client node of this command's own: give the swarm with "
                               "--initial-peers (or --peers); the daemon's client picks its wire per hop")
    if adapter:
        raise click.UsageError("--adapter needs a client node of this command's own: give the swarm with "
                               "--initial-peers (or --peers); the local API does not select adapters")
    if head_quant != "none":
        raise click.UsageError("--head-quant applies to a client node of this command's own: give the swarm "
                               "with --initial-peers (or --peers), or start the daemon with --head-quant")


def _daemon_model_name(ctx: click.Context, model: str | None) -> str | None:
    """The model id to ask the daemon for: None (whatever it serves) unless --model was typed."""
    if model is None or not from_command_line(ctx, "model"):
        return None
    from petald.kernels.sources.open_source import open_source

    return open_source(model).identity.model_id
