"""``petald demo``: a local swarm of server processes on 127.0.0.1, and a question through it."""

from __future__ import annotations

import click

from petald.cli.command_errors import run_command
from petald.cli.logs import setup_logging


@click.command()
@click.argument("prompt", default="What is the capital of France?")
@click.option("--servers", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option("--model", default=None, help="Default: embedded SmolLM2-135M-Instruct.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--debug", is_flag=True)
def demo(prompt, servers, model, max_new_tokens, debug) -> None:
    """Start a local swarm of SERVERS processes on 127.0.0.1 and chat through it."""
    setup_logging(False)

    def run() -> None:
        from petald.cli.local_swarm import LocalSwarm, even_spans
        from petald.cli.text_generation import Sampling, generate_text
        from petald.kernels.sources.open_source import open_source
        from petald.p2pnode.client.distributed_model import DistributedModel

        source = open_source(model)
        spans = even_spans(source.identity.num_blocks, servers)
        click.echo(f"petald demo: starting {servers} servers for {source.identity.model_id}: {', '.join(spans)}")
        with LocalSwarm(spans, model, log=lambda t: click.echo(f"petald demo: {t}"), quant=None) as local:
            click.echo(f"petald demo: finding the servers through the DHT from {local.addresses[0]}")
            with DistributedModel(model=source, initial_peers=local.addresses[:1]) as dm:
                click.echo(f"petald demo: route {dm.route().describe()}")
                click.echo(f"\n>>> {prompt}\n")
                generate_text(dm, prompt, Sampling(max_new_tokens, 0.0, 1.0, None), chat=True)
        click.echo("petald demo: servers stopped")

    run_command(run, debug)
