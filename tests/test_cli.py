"""The command line as a person meets it: clear errors, stable identities, clean shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from petald.cli.local_swarm import LocalSwarm

PETALD = [sys.executable, "-m", "petald.cli.main"]


def run_petald(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PETALD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--blocks", "0:99"], "need 0 <= A < B <= 6"),
        (["serve", "--blocks", "x"], "expected A:B"),
        (["serve", "--blocks", "0:2", "--model", "/no/such/model"], "not found"),
        (["generate", "hi", "--peers", "/ip4/127.0.0.1/tcp/1"], "no /p2p/"),
        (["generate", "hi"], "--initial-peers"),
        (["generate", "hi", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"],
         "not both"),
        (["serve", "--blocks", "0:2"], "--new-swarm"),
        (["serve", "--blocks", "auto", "--num-blocks", "7", "--new-swarm"], "this model has 6 blocks"),
        (["swarm", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], "no /p2p/"),
        (["generate", "", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "prompt is empty"),
        (["generate", "hi", "--top-p", "0", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "--top-p"),
        (["daemon"], "--initial-peers"),
        (["daemon", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"],
         "none of the initial peers answered"),
        (["serve", "--blocks", "0:2", "--new-swarm", "--http", "8080"], "expected HOST:PORT"),
        (["chat", "--daemon"], "no petald daemon answers"),
        (["serve", "--blocks", "0:2", "--new-swarm", "--adapters", "/no/such/adapter"],
         "adapter /no/such/adapter does not exist"),
        (["serve", "--blocks", "0:2", "--new-swarm", "--adapters", "/tmp"], "adapter_config.json"),
        (["generate", "hi", "--head-quant", "fp8", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "'--head-quant'"),
        (["serve", "--blocks", "0:2", "--new-swarm", "--no-api", "--head-quant", "bf16"], "with --no-api there is none"),
        (["generate", "hi", "--head-quant", "nf4", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/x"],
         "the LM head cannot be stored as nf4: --quant nf4 needs a CUDA device"),
    ],
)
def test_errors_are_sentences_not_tracebacks(tiny_models, args, message):
    if "--model" not in args and args[0] != "swarm":
        args = [*args, "--model", str(tiny_models["llama"])]
    result = run_petald(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_named(tiny_models):
    address = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"
    result = run_petald("generate", "hi", "--peers", address, "--model", str(tiny_models["llama"]), timeout=120)
    assert result.returncode == 1
    assert "no usable server" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_identity_is_stable_and_signals_stop_cleanly(tmp_path, tiny_models, sig):
    key = tmp_path / "node.key"
    args = ["--model", str(tiny_models["llama"]), "--identity", str(key)]
    peer_ids = []
    for _ in range(2):
        with LocalSwarm(["0:6"], extra_args=args) as swarm:
            peer_ids.append(swarm.addresses[0].rsplit("/p2p/", 1)[1])
            server = swarm.servers[0]
            assert server.stop(sig) == 0
        assert any("shutting down" in line for line in server.output)
        assert any(line.startswith("petald: stopped") for line in server.output)
    assert peer_ids[0] == peer_ids[1]
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_demo_runs_a_local_swarm_and_answers():
    result = run_petald("demo", "What is the capital of France?", "--max-new-tokens", "12", timeout=400)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ready at /ip4/127.0.0.1/") == 2
    assert "Paris" in result.stdout
    assert "servers stopped" in result.stdout


def test_port_in_use_is_reported(tiny_models):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_petald("serve", "--blocks", "0:6", "--model", str(tiny_models["llama"]), "--new-swarm",
                            "--listen", f"/ip4/127.0.0.1/tcp/{port}", timeout=120)
    assert result.returncode == 1
    assert "could not listen" in result.stderr and "Traceback" not in result.stderr


def test_even_spans_cover_every_block_once():
    from petald.cli.local_swarm import even_spans

    assert even_spans(30, 2) == ["0:15", "15:30"]
    assert even_spans(30, 3) == ["0:10", "10:20", "20:30"]
    for blocks, servers in [(6, 4), (7, 3), (30, 1)]:
        spans = [tuple(map(int, s.split(":"))) for s in even_spans(blocks, servers)]
        assert spans[0][0] == 0 and spans[-1][1] == blocks and len(spans) == servers
        assert all(a < b for a, b in spans) and all(p[1] == q[0] for p, q in zip(spans, spans[1:], strict=False))
