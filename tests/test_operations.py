"""Operations without a swarm: configuration precedence, the systemd unit and readiness, the API
socket's claiming rules, the text assembler behind stop strings, progress, the swarm table."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.petald_cli import assert_refused, invoke

# --- configuration -------------------------------------------------------------------------------

def _socket_used(*before: str, after: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    """The socket ``petald [BEFORE] generate hi --daemon [AFTER]`` looked for (nothing answers there)."""
    result = invoke(*before, "generate", "hi", "--daemon", *after, env=env)
    assert result.exit_code == 1 and result.stderr.startswith("Error: no petald daemon answers on "), result.stderr
    return result.stderr.split("no petald daemon answers on ", 1)[1].split(":", 1)[0]


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "petald.toml"
    config.write_text('socket = "/tmp/from-file.sock"\n')
    assert _socket_used() == os.path.join(os.environ["XDG_RUNTIME_DIR"], "petald", "api.sock")  # the default
    assert _socket_used("--config", str(config)) == "/tmp/from-file.sock"
    env = {"PETALD_SOCKET": "/tmp/from-env.sock"}
    assert _socket_used("--config", str(config), env=env) == "/tmp/from-env.sock"
    assert _socket_used("--config", str(config), after=("--socket", "/tmp/from-flag.sock"), env=env) \
        == "/tmp/from-flag.sock"


def section(shown: str, name: str) -> str:
    """One command's table of ``config show``."""
    return shown.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]


def test_top_level_keys_apply_to_every_command_and_tables_win(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('initial_peers = ["/ip4/127.0.0.1/tcp/1/p2p/A"]\nmax_new_tokens = 7\n'
                      '[chat]\nmax-new-tokens = 99\n')
    shown = invoke("--config", str(config), "config", "show").output
    generate, chat = section(shown, "generate"), section(shown, "chat")
    assert f"max_new_tokens = 7  # file {config}" in generate
    assert f"max_new_tokens = 99  # file {config} [chat]" in chat
    assert 'initial_peers = ["/ip4/127.0.0.1/tcp/1/p2p/A"]' in section(shown, "serve")
    env = {"PETALD_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/2/p2p/B, /ip4/127.0.0.1/tcp/3/p2p/C"}
    shown = invoke("--config", str(config), "config", "show", "daemon", env=env).output
    assert 'initial_peers = ["/ip4/127.0.0.1/tcp/2/p2p/B", "/ip4/127.0.0.1/tcp/3/p2p/C"]  # env PETALD_INITIAL_PEERS' \
        in shown
    assert "[serve]" not in shown


def test_default_config_file_is_found_and_the_environment_names_another(tmp_path):
    home = tmp_path / "xdg"
    (home / "petald").mkdir(parents=True)
    (home / "petald" / "config.toml").write_text("[serve]\nblocks = \"0:4\"\n")
    other = tmp_path / "other.toml"
    other.write_text("[serve]\nblocks = \"2:6\"\n")
    assert 'blocks = "0:4"' in invoke("config", "show", "serve", env={"XDG_CONFIG_HOME": str(home)}).output
    shown = invoke("config", "show", "serve", env={"XDG_CONFIG_HOME": str(home), "PETALD_CONFIG": str(other)}).output
    assert 'blocks = "2:6"' in shown and f"# config file: {other}" in shown


@pytest.mark.parametrize("text, message", [
    ("blocks = [", "the config file {path} is not valid TOML: Invalid value (at end of document)"),
    ("no_such_option = 1", "{path}: 'no_such_option' is not an option of any petald command"),
    ("[serve]\nprompt_tokens = 3", "{path}: [serve] 'prompt_tokens' is not an option of petald serve"),
    ("[fly]\nx = 1", "{path}: [fly] is not a petald command (commands: chat, daemon, demo, generate, serve, swarm)"),
    ("[serve]\ninitial_peers = 5", "{path} [serve]: initial_peers must be a list"),
    ("[serve]\nblocks = [1]", "{path} [serve]: blocks must be a single value"),
])
def test_bad_config_files_are_sentences(tmp_path, text, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = invoke("--config", str(config), "config", "show")
    assert_refused(result, 1, "Error: " + message.format(path=config))


def test_missing_named_config_file_is_an_error(tmp_path):
    result = invoke("--config", str(tmp_path / "none.toml"), "config", "show")
    assert_refused(result, 1, f"Error: the config file {tmp_path / 'none.toml'} does not exist")


def test_config_values_are_checked_like_flags(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[generate]\ntemperature = -1\n")
    result = invoke("--config", str(config), "generate", "hi")
    assert_refused(result, 2, "Invalid value for '--temperature': -1.0 is not in the range 0.0<=x<=2.0.")


# --- systemd -------------------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("system", [False, True], ids=["user-unit", "system-unit"])
@pytest.mark.parametrize("args", [["--", "--new-swarm"], ["--", "--initial-peers", "/ip4/10.0.0.1/tcp/31330/p2p/QmX", "--device", "cuda"],
                                  ["--", "daemon", "--initial-peers", "/ip4/10.0.0.1/tcp/1/p2p/QmX", "--http",
                                   "127.0.0.1:8080", "--model", "/srv/models/my model 100%"]],
                         ids=["serve", "serve-cuda", "daemon"])
def test_unit_file_passes_systemd_analyze_verify(tmp_path, system, args):
    unit = tmp_path / "petald.service"
    result = invoke("install-service", "--output", str(unit), *(["--system"] if system else []), *args)
    assert result.exit_code == 0, result.output
    text = unit.read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                 "StateDirectory=petald", "RuntimeDirectory=petald", "PrivateTmp=yes"):
        assert line in text
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    command = [SYSTEMD_ANALYZE, *([] if system else ["--user"]), "verify", str(unit)]
    check = subprocess.run(command, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="warning"))
    # verify exits 0 on mere warnings (an unknown key, say): any output at all fails this test.
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stderr


@pytest.mark.parametrize("system", [False, True], ids=["user-unit", "system-unit"])
def test_install_service_writes_the_unit_and_says_how_to_start_it(tmp_path, system):
    from petald.cli.systemd.unit import unit_text

    unit = tmp_path / "units" / "petald-7.service"
    args = ["--", "--initial-peers", "/ip4/10.0.0.1/tcp/1/p2p/QmX"]
    result = invoke("install-service", "--output", str(unit), "--name", "petald-7", *(["--system"] if system else []),
                    *args)
    assert result.exit_code == 0, result.output
    manager, journal = ("systemctl", "journalctl -u") if system else ("systemctl --user", "journalctl --user -u")
    assert result.stdout == (f"petald: wrote {unit}\n"
                             f"petald: start it with: {manager} daemon-reload && {manager} enable --now "
                             "petald-7.service\n"
                             f"petald: its log: {journal} petald-7.service -f\n"
                             + ("" if system else "petald: to keep it running after you log out: "
                                                  "loginctl enable-linger\n"))
    assert unit.read_text() == unit_text(args[1:], system, None)
    printed = invoke("install-service", "--print", *(["--system"] if system else []), *args)
    assert printed.exit_code == 0 and printed.stdout == unit.read_text()


def test_unit_runs_petald_with_systemd_directories():
    from petald.cli.systemd.unit import service_command, unit_text

    command = service_command(["--blocks", "0:4"], system=False, python="/opt/venv/bin/python")
    assert command[:4] == ["/opt/venv/bin/python", "-m", "petald.cli.main", "serve"]
    assert "%S/petald/identity.key" in command and "%t/petald/api.sock" in command
    own = service_command(["daemon", "--identity", "/k", "--no-api"], system=True)
    assert own[3] == "daemon" and "%S/petald/identity.key" not in own and "%t/petald/api.sock" not in own
    text = unit_text(["--model", "/m/100% $HOME"], system=False, python="/py")
    assert '"/m/100%% $$HOME"' in text  # systemd specifiers and variables escaped
    assert "PrivateDevices=yes" in text and "PrivateDevices" not in unit_text(["--device", "cuda"], system=True)


def test_readiness_datagrams_reach_notify_socket(tmp_path, monkeypatch):
    from petald.cli.systemd import notify as systemd_notify

    assert systemd_notify.notify("READY=1") is False  # no NOTIFY_SOCKET: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd_notify.notify("READY=1", "STATUS=serving")
        systemd_notify.status("loading blocks\nsecond line")
        assert receiver.recv(100) == b"READY=1\nSTATUS=serving"
        assert receiver.recv(100) == b"STATUS=loading blocks"
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # nobody reads: the queue fills up
        for _ in range(10_000):
            if not systemd_notify.notify("STATUS=" + "x" * 1000):
                break  # dropped, not blocked
        else:
            raise AssertionError("notify never found the queue full")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd_notify.notify("READY=1") is False  # a vanished socket never stops the daemon


# --- the API socket ------------------------------------------------------------------------------

def test_socket_is_claimed_private_stale_ones_replaced_live_ones_refused(tmp_path):
    from petald.cli.api.unix_socket import (
        SocketInUseError,
        claim_socket,
        default_socket_path,
        release_socket,
    )

    path = tmp_path / "run" / "api.sock"
    sock, inode = claim_socket(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SocketInUseError, match="already serving its API"):
        claim_socket(path)
    sock.close()  # the daemon died without cleaning up: a stale file
    sock, inode = claim_socket(path)
    release_socket(path, inode)
    assert not path.exists()
    sock.close()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        claim_socket(path)
    with pytest.raises(OSError, match="Unix limit"):
        claim_socket(tmp_path / ("x" * 120) / "api.sock")
    assert default_socket_path() == Path(os.environ["XDG_RUNTIME_DIR"]) / "petald" / "api.sock"


def test_socket_group_lets_a_group_in(tmp_path):
    import grp

    from petald.cli.api.unix_socket import claim_socket

    group = grp.getgrgid(os.getgid())
    path = tmp_path / "api.sock"
    sock, _ = claim_socket(path, group.gr_name)
    with sock:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660 and path.stat().st_gid == group.gr_gid
    with pytest.raises(OSError, match="no such group"):
        claim_socket(tmp_path / "other.sock", "no-such-group-petald")


def test_default_socket_without_a_runtime_dir(monkeypatch, tmp_path):
    from petald.cli.api.unix_socket import default_socket_path

    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_socket_path() == tmp_path / ".petald" / "api.sock"


def test_serve_refuses_a_socket_a_live_daemon_holds_before_loading(tmp_path, tiny_models):
    from petald.cli.api.unix_socket import claim_socket

    path = tmp_path / "api.sock"
    sock, _ = claim_socket(path)
    with sock:
        result = invoke("serve", "--model", str(tiny_models["llama"]), "--new-swarm", "--socket", str(path))
    assert_refused(result, 1, f"petald: error: another petald daemon is already serving its API on {path}: stop "
                              "it, or give this one another --socket (or --no-api)")
    assert result.stdout == ""  # refused before the model was opened


# --- text, progress, table -----------------------------------------------------------------------

class Letters:
    """A tokenizer stand-in: token i is the i-th character of ``text``."""

    def __init__(self, text: str):
        self.text = text

    def __call__(self, ids: list[int]) -> str:
        return "".join(self.text[i] for i in ids)


@pytest.mark.parametrize("text, stop, expected", [
    ("hello world", [], "hello world"),
    ("hello world", ["wor"], "hello "),
    ("hello world", ["xyz", "lo w"], "hel"),
    ("hello world", ["world!"], "hello world"),  # a partial stop string held back, then released
])
def test_text_assembler_cuts_at_stop_strings_and_holds_back_prefixes(text, stop, expected):
    from petald.cli.text_assembler import TextAssembler

    assembler = TextAssembler(Letters(text), stop)
    pieces = []
    for i in range(len(text)):
        pieces.append(assembler.add(i))
        if stop == ["wor"] and "".join(pieces).endswith("hello "):
            assert assembler.emitted <= len("hello ")  # "w" could start "wor": not sent yet
        if assembler.stopped:
            break
    assert "".join(pieces) + assembler.tail() == expected
    assert assembler.stopped == (expected != text)


def test_text_assembler_waits_for_whole_characters():
    from petald.cli.text_assembler import TextAssembler

    decoded = {1: "a", 2: "a\ufffd", 3: "aé"}
    assembler = TextAssembler(lambda ids: decoded[len(ids)], [])
    assert [assembler.add(0), assembler.add(0), assembler.add(0)] == ["a", "", "é"]


def test_progress_lines_without_a_terminal():
    from petald.cli.progress import ProgressDisplay

    said: list[str] = []
    progress = ProgressDisplay(said.append, bars=False)
    for done in range(1, 11):
        progress("loading blocks 0:10", done, 10)
    progress("loading blocks 0:10", 10, 10)  # an end reported twice is said once
    assert said == [f"loading blocks 0:10: {n}/10 ({10 * n}%)" for n in (2, 4, 6, 8, 10)]
    progress("loading blocks 0:10", 1, 10)  # the same task again starts afresh
    progress("loading blocks 0:10", 10, 10)
    assert said[-1] == "loading blocks 0:10: 10/10 (100%)" and len(said) == 6
    assert all("\r" not in line and "\x1b" not in line for line in said)


def test_progress_bars_on_a_terminal():
    import io

    from petald.cli.progress import ProgressDisplay

    screen, said = io.StringIO(), []
    progress = ProgressDisplay(said.append, stream=screen, bars=True)
    for done in range(1, 7):
        progress("loading blocks 0:6", done, 6)
    assert said == [] and "6/6" in screen.getvalue() and "100%" in screen.getvalue()


def test_swarm_table_groups_blocks_and_marks_gaps():
    from petald.cli.swarm_table import format_swarm_table

    def server(peer: str, start: int, end: int) -> dict:
        return {"peer_id": peer, "start": start, "end": end, "state": "online", "inference_rps": 100.0,
                "forward_tps": 900.0, "free_cache_tokens": 4096, "dtype": "float32", "quant": "none",
                "addresses": [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"]}

    servers = [server("12D3KooWAAAAAAAAAAAAAAAAAAA1", 0, 4), server("12D3KooWBBBBBBBBBBBBBBBBBBB2", 2, 5)]
    servers[1]["adapters"] = ["style"]
    blocks = [{"block": b, "servers": [s["peer_id"] for s in servers if s["start"] <= b < s["end"]],
               "inference_rps": 100.0 * sum(s["start"] <= b < s["end"] for s in servers)} for b in range(8)]
    table = format_swarm_table([{"model_id": "m@1", "num_blocks": 8, "uncovered_blocks": [5, 6, 7],
                                 "servers": servers, "blocks": blocks}])
    assert "m@1  (8 blocks, 2 of 2 servers online)" in table
    rows = [line.split() for line in table.splitlines()]
    assert ["0:2", "1", "100"] in rows and ["2:4", "2", "200"] in rows and ["4:5", "1", "100"] in rows
    assert any(r[:3] == ["5:8", "0", "0"] and "UNCOVERED:" in r for r in rows)
    assert "3 blocks uncovered" in table
    assert "adapter style: on 2:5" in table
    assert format_swarm_table([]) == "no servers found in the swarm"
