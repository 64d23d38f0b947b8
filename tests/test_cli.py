"""The command line as a person meets it: clear errors, stable identities, clean shutdown.

Commands run in this process (click's CliRunner) unless the process itself is what is tested."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from petald.cli.local_swarm import LocalSwarm
from tests.petald_cli import assert_refused, invoke, run_petald

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw"
NO_PEER_ID = "has no /p2p/<peer id> part; copy the full address a server prints"
DEFAULT_SOCKET = "{runtime}/petald/api.sock"
NEW_SWARM = ["serve", "--blocks", "0:2", "--new-swarm"]
A_PEER = ["--peers", "/ip4/127.0.0.1/tcp/1/p2p/x"]

# Errors a person can act on, said as one sentence after "petald: error: " (exit 1): (arguments,
# the sentence, whether the model was opened first). {model}, {runtime}, {unreachable} are filled in.
SENTENCES = [
    (["serve", "--blocks", "0:99", "--new-swarm"], "--blocks '0:99': need 0 <= A < B <= 6 (this model has 6 blocks)", True),
    (["serve", "--blocks", "x", "--new-swarm"], "--blocks 'x': expected A:B with integers (e.g. 0:15) or auto",
     False),
    (["serve", "--blocks", "0:2", "--model", "/no/such/model", "--new-swarm"], "model '/no/such/model' not found: give a .gguf "
     "file, a Hugging Face directory, or 'smollm2'; loading from a model hub is not supported yet", True),
    (["serve", "--blocks", "0:2"], "a server joins a swarm: pass --initial-peers ADDR (any node of the swarm), or "
     "--new-swarm to start a new one", False),
    (["serve", "--blocks", "auto", "--num-blocks", "7", "--new-swarm"], "--num-blocks 7: this model has 6 blocks",
     True),
    ([*NEW_SWARM, "--http", "8080"], "--http '8080': expected HOST:PORT, e.g. 127.0.0.1:8080", False),
    ([*NEW_SWARM, "--adapters", "/no/such/adapter"], "adapter /no/such/adapter does not exist: give a directory "
     "saved by peft's save_pretrained (adapter_config.json and adapter_model.safetensors)", True),
    ([*NEW_SWARM, "--adapters", "/tmp"], "/tmp is not a PEFT adapter: it has no adapter_config.json", True),
    (["generate", "hi", "--peers", "/ip4/127.0.0.1/tcp/1"], f"'/ip4/127.0.0.1/tcp/1' {NO_PEER_ID}", False),
    (["generate", "hi", "--head-quant", "nf4", *A_PEER], "the LM head cannot be stored as nf4: --quant nf4 needs "
     "a CUDA device and bitsandbytes (pip install bitsandbytes); on CPU use --quant int8 or int4", False),
    (["swarm", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], f"'/ip4/127.0.0.1/tcp/1' {NO_PEER_ID}", False),
    (["daemon", "--initial-peers", "{unreachable}"],
     "none of the initial peers answered: 12D3KooWLshnq6TvssFMhSmSWnA2BbJjLsUyW1PRy6dcDC61H1mw", True),
]

# Usage errors (exit 2, after click's usage lines), all before anything is opened.
USAGE_ERRORS = [
    ([*NEW_SWARM, "--listen", "0.0.0.0:31337"], "Invalid value for '--listen': '0.0.0.0:31337' is not a TCP "
     "multiaddr: write it as /ip4/0.0.0.0/tcp/31337"),
    (["daemon", "--listen", "localhost:4001"], "Invalid value for '--listen': 'localhost:4001' is not a TCP "
     "multiaddr: write it as /ip4/ADDRESS/tcp/4001, with an IP address of this machine for localhost"),
    ([*NEW_SWARM, "--no-api", "--head-quant", "bf16"], "--head-quant sets how the local API's model stores its LM "
     "head; with --no-api there is none: drop one of the two"),
    (["generate", "hi"], f"no local daemon answers on {DEFAULT_SOCKET}, and no swarm was given: give any node of "
     "the swarm with --initial-peers MULTIADDR (or the servers themselves with --peers MULTIADDR ...), or start a "
     "daemon (petald serve / petald daemon)"),
    (["generate", "hi", *A_PEER, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "give either --initial-peers "
     "(find servers in the swarm) or --peers (use exactly these servers), not both"),
    (["generate", "", *A_PEER], "the prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "100000000", *A_PEER], "--max-new-tokens 100000000 leaves no room "
     "for a prompt: the model's context is 512 tokens; give at most 511"),
    (["generate", "hi", "there", *A_PEER], "unexpected arguments ['there']: quote the prompt, and give peers as "
     "multiaddrs"),
    (["generate", "hi", "--top-p", "0", *A_PEER], "Invalid value for '--top-p': 0.0 is not in the range 0.0<x<=1.0."),
    (["generate", "hi", "--head-quant", "fp8", *A_PEER],
     "Invalid value for '--head-quant': 'fp8' is not one of 'auto', 'none', 'int8', 'int4', 'nf4', 'bf16'."),
    (["generate", "hi", "--wire", "int8", "--wire-dtype", "float16", *A_PEER], "--wire-dtype float16 contradicts "
     "--wire int8: give --wire alone (--wire-dtype is its old name)"),
    (["chat", "--lz4", *A_PEER], "--lz4 is gone: measured on real hidden states it made them 0.4% larger, not "
     "smaller; use --wire int8 to halve the bytes of the 16-bit default"),
    (["generate", "hi", "--wire", "float64", *A_PEER],
     "Invalid value for '--wire': 'float64' is not one of 'auto', 'float32', 'bfloat16', 'float16', 'int8'."),
    (["chat", *A_PEER, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "give either --initial-peers or --peers, "
     "not both"),
    (["swarm"], f"no local daemon answers on {DEFAULT_SOCKET}: give any node of the swarm with --initial-peers "
     "MULTIADDR"),
    (["daemon"], "a daemon joins a swarm: pass --initial-peers MULTIADDR (any node of the swarm)"),
]


def _petald_with_model(tiny_models, args: list[str]):
    """``petald ARGS`` with the tiny Llama unless ARGS name a model (swarm takes none); and the fill-ins."""
    fill = {"model": str(tiny_models["llama"]), "runtime": os.environ["XDG_RUNTIME_DIR"], "unreachable": UNREACHABLE}
    args = [a.format(**fill) for a in args]
    if "--model" not in args and args[0] != "swarm":
        args += ["--model", fill["model"]]
    return invoke(*args), args, fill


@pytest.mark.parametrize("args, message, opened", SENTENCES, ids=lambda v: v if isinstance(v, str) else None)
def test_errors_are_sentences_not_tracebacks(tiny_models, args, message, opened):
    result, args, fill = _petald_with_model(tiny_models, args)
    assert_refused(result, 1, "petald: error: " + message.format(**fill))
    assert result.stdout == (f"petald: opening model {args[args.index('--model') + 1]}\n" if opened else "")


@pytest.mark.parametrize("args, message", USAGE_ERRORS, ids=lambda v: v if isinstance(v, str) else None)
def test_usage_errors_say_what_to_give(tiny_models, args, message):
    result, _, fill = _petald_with_model(tiny_models, args)
    assert_refused(result, 2, message.format(**fill))
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["chat"], ["generate", "hi"]])
def test_daemon_asked_for_but_not_running(command):
    result = invoke(*command, "--daemon")
    assert_refused(result, 1, f"Error: no petald daemon answers on {os.environ['XDG_RUNTIME_DIR']}/petald/api.sock: "
                              "start one (petald serve, petald daemon) or leave out --daemon")


def test_unreachable_server_is_named(tiny_models):
    result = invoke("generate", "hi", "--peers", UNREACHABLE, "--model", str(tiny_models["llama"]))
    assert result.exit_code == 1 and result.stdout == ""
    # What it did while the person waited, then the error; the reason after the address is py-libp2p's own wording.
    said, error = result.stderr.split("\n", 1)
    assert said == ("petald: connecting to 1 server(s)... (a daemon stays joined, so commands start at once: "
                    "petald daemon --initial-peers ADDR)")
    assert error.startswith(f"petald: error: no usable server among the peers given:\n  {UNREACHABLE}: "
                            "unable to connect to 12D3KooW"), result.stderr


def test_port_in_use_is_reported(tiny_models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("serve", "--blocks", "0:6", "--model", str(tiny_models["llama"]), "--new-swarm",
                        "--quant", "none", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert_refused(result, 1, f"petald: error: port {port} on 127.0.0.1 is already in use (another petald, or "
                              "another program): choose another --listen port, or stop what holds it")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.stdout.split("\nCommands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == ["chat", "config", "daemon", "demo", "generate", "install-service",
                                                    "serve", "swarm", "swarm-key", "swarm-members",
                                                    "swarm-owner-key"]
    assert result.stdout.startswith("Usage: petald [OPTIONS] COMMAND [ARGS]...\n")


def test_module_entry_point_runs_the_command_line():
    """Servers, the demo's and systemd's, are started as ``python -m petald.cli.main``."""
    result = run_petald("config", "show", "nope", timeout=60)
    assert result.returncode == 2
    assert result.stderr.endswith("\nError: no command 'nope'; commands: chat, daemon, demo, generate, serve, swarm\n")


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
        said = f"petald: received {signal.Signals(sig).name}: shutting down"
        assert any(line.startswith(said) for line in server.output), server.output
        assert any(line.startswith("petald: stopped") for line in server.output)
    assert peer_ids[0] == peer_ids[1]
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_demo_runs_a_local_swarm_and_answers():
    result = run_petald("demo", "What is the capital of France?", "--max-new-tokens", "12", timeout=400)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ready at /ip4/127.0.0.1/") == 2
    assert "Paris" in result.stdout
    assert result.stdout.endswith("petald demo: servers stopped\n")


def test_chat_keeps_the_history_and_forgets_it_on_reset():
    import io

    from petald.cli.chat import run_chat
    from petald.cli.text_generation import Sampling

    asked: list[list[dict[str, str]]] = []

    def reply(messages, sampling, out, stop) -> str:
        asked.append([dict(m) for m in messages])
        answer = f"answer {len(asked)}"
        out.write(answer)
        return answer

    out = io.StringIO()
    run_chat(reply, Sampling(8, 0.0, 1.0, None), "Be brief.",
             io.StringIO("hi\n\nmore\n/rest\n/reset\nagain\n/exit\nlost\n"), out)
    system = {"role": "system", "content": "Be brief."}
    assert asked == [
        [system, {"role": "user", "content": "hi"}],
        [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer 1"},
         {"role": "user", "content": "more"}],
        [system, {"role": "user", "content": "again"}],
    ]
    assert out.getvalue() == ("answer 1\nanswer 2\n(unknown command /rest: /reset forgets the conversation, /exit "
                              "or Ctrl-D ends it, Ctrl-C stops an answer; a message that starts with / is sent as "
                              "//message)\n(conversation forgotten)\nanswer 3\n")


def test_ctrl_c_stops_the_answer_and_keeps_the_chat():
    """The first Ctrl-C (a real SIGINT) ends the answer at its next token and the chat goes on
    without that question; a second one during an answer interrupts at once."""
    import io
    import signal

    from petald.cli.chat import run_chat
    from petald.cli.text_generation import Sampling, check_stop

    asked: list[list[str]] = []

    def reply(messages, sampling, out, stop) -> str:  # prints like print_generated: a stop check per token
        asked.append([m["content"] for m in messages])
        words = ["one", " two", " three"]
        for i, word in enumerate(words):
            check_stop(stop)
            out.write(word)
            if messages[-1]["content"] == "stop me" and i == 0:
                signal.raise_signal(signal.SIGINT)
        return "".join(words)

    out = io.StringIO()
    run_chat(reply, Sampling(8, 0.0, 1.0, None), None, io.StringIO("hi\nstop me\nagain\n"), out)
    assert asked == [["hi"], ["hi", "one two three", "stop me"], ["hi", "one two three", "again"]]
    assert out.getvalue() == ("one two three\none\n(answer stopped; that question is forgotten)\n"
                              "one two three\n")

    def stuck(messages, sampling, out, stop) -> str:  # a server that hangs: no next token to stop at
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return "never"

    with pytest.raises(KeyboardInterrupt):
        run_chat(stuck, Sampling(8, 0.0, 1.0, None), None, io.StringIO("hi\n"), io.StringIO())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the chat's handler is gone


def test_even_spans_cover_every_block_once():
    from petald.cli.local_swarm import even_spans

    assert even_spans(30, 2) == ["0:15", "15:30"]
    assert even_spans(30, 3) == ["0:10", "10:20", "20:30"]
    for blocks, servers in [(6, 4), (7, 3), (30, 1)]:
        spans = [tuple(map(int, s.split(":"))) for s in even_spans(blocks, servers)]
        assert spans[0][0] == 0 and spans[-1][1] == blocks and len(spans) == servers
        assert all(a < b for a, b in spans) and all(p[1] == q[0] for p, q in zip(spans, spans[1:], strict=False))


def test_a_log_line_never_lands_inside_streamed_text():
    """A failover warning while a generation streams: on stderr, on a line of its own, once."""
    import io
    import logging

    from petald.cli.logs import OwnLineHandler, StreamedLine

    line, stderr = StreamedLine(), io.StringIO()
    handler = OwnLineHandler(stderr, line)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("petald.test.own_line")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before any text")
        line.wrote("Once upon")  # what text_generation.show notes of the text it prints
        logger.warning("server ..abc failed")
        logger.warning("blocks 0:3 recovered")
        line.wrote(" a time\n")
        logger.warning("after the line")
    finally:
        logger.removeHandler(handler)
    assert stderr.getvalue() == ("WARNING before any text\n\nWARNING server ..abc failed\n"
                                 "WARNING blocks 0:3 recovered\nWARNING after the line\n")


# --- several servers on one machine ---------------------------------------------------------------

def test_a_second_server_leaves_the_default_socket_to_the_first(tmp_path, monkeypatch):
    """The default socket taken by a live petald: a server goes on without it and says so once;
    a socket given explicitly stays an error, whose hint names the command's own options."""
    from petald.cli.api.unix_socket import SocketInUseError, claim_socket, default_socket_path
    from petald.cli.options import api_listen

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first, _ = claim_socket(default_socket_path())  # the first server's API, alive
    said: list[str] = []
    try:
        assert api_listen(None, None, None, "serve", said.append) is None  # nothing left to serve
        with_http = api_listen(None, None, "127.0.0.1:0", "serve", said.append)
        assert with_http is not None and with_http.socket_path is None and with_http.http == "127.0.0.1:0"
        assert said == [f"the local API's default socket {default_socket_path()} is another petald's: this one "
                        "serves without it (give --socket PATH for an API of its own)"] * 2
        for command, hint in [("serve", "stop it, or give this one another --socket (or --no-api)"),
                              ("daemon", "stop it (one daemon serves every command of this machine), or give "
                                         "this one another --socket")]:
            with pytest.raises(SocketInUseError) as err:
                api_listen(str(default_socket_path()), None, None, command, said.append)
            assert str(err.value) == f"another petald daemon is already serving its API on {default_socket_path()}: {hint}"
    finally:
        first.close()


def test_a_taken_http_port_fails_before_joining(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("daemon", "--initial-peers", UNREACHABLE, "--socket", str(tmp_path / "api.sock"),
                        "--http", f"127.0.0.1:{port}")
    assert_refused(result, 1, f"petald: error: --http 127.0.0.1:{port}: cannot listen there (Address already in "
                              "use): another petald or another program holds the port; choose another --http port, "
                              "or stop what holds it")
    assert result.stdout == ""  # refused before the model was opened or the swarm dialled


def test_a_bad_environment_value_is_named_as_the_variable(tiny_models):
    result = invoke(*NEW_SWARM, "--model", str(tiny_models["llama"]), env={"PETALD_MAX_LENGTH": "abc"})
    assert result.exit_code != 0 and result.stdout == ""  # before anything is opened
    assert result.stderr.strip().endswith("PETALD_MAX_LENGTH='abc': 'abc' is not a valid integer."), result.stderr


def test_install_service_checks_the_arguments_it_writes(monkeypatch):
    result = invoke("install-service", "--print", "--", "--listen", "0.0.0.0:31337", "--new-swarm")
    assert_refused(result, 2, "petald serve would refuse these arguments: Invalid value for '--listen': "
                              "'0.0.0.0:31337' is not a TCP multiaddr: write it as /ip4/0.0.0.0/tcp/31337")
    result = invoke("install-service", "--print", "--", "--blocks", "auto")
    assert_refused(result, 2, "petald serve needs to know its swarm: add --initial-peers ADDR (any node of the "
                              "swarm), or --new-swarm after --")
    result = invoke("install-service", "--print", "--", "daemon", "--max-length", "5")
    assert_refused(result, 2, "petald daemon would refuse these arguments: No such option '--max-length'.")
    monkeypatch.setattr("sys.executable", "/tmp/venv/bin/python")
    result = invoke("install-service", "--print", "--", "--new-swarm")
    assert result.exit_code == 0 and "ExecStart=/tmp/venv/bin/python -m petald.cli.main serve" in result.stdout
    assert result.stderr == ("petald: warning: the unit runs /tmp/venv/bin/python, under tmp/, which its "
                             "PrivateTmp=yes hides from the service: install petald in a virtualenv elsewhere first\n")
