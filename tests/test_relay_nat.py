"""Servers behind a real NAT (the internet in a box): found unreachable, served through a relay.

public1: the swarm's first server (blocks 0:3). public2: a relay serving no blocks. home: a server
(blocks 3:6) behind a NAT router with no inbound; its initial peers are the relay and public1.
It must find by itself (dial-back) that it is unreachable, reserve on the relay and announce its
circuit address; a client on ``client`` then generates the transformers oracle's greedy tokens
(float32 wire) with the home server's blocks reached through the relay. Mid-way through a second
generation the relay is killed: its circuit drops, the home server moves to public1 as its relay,
and the client fails over (replaying its history) to the same tokens (direct upgrades off on
both sides, so that the session is on the circuit when the relay dies).

With a client behind a NAT of its own (home2), DCUtR punches a direct connection between the two
homes and the client's next generation uses it, with the same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.internet_in_a_box import InternetInABox, require_internet_in_a_box
from tests.oracle import reference_greedy

pytestmark = pytest.mark.slow

IDS = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(7))
NEW_TOKENS = 16
SERVER_ARGS = ["--threads", "1", "--announce-period", "2", "--shutdown-grace", "1", "--no-api", "--quant", "none"]


class Process:
    """A process in the box whose output lines are collected as they come."""

    def __init__(self, box: InternetInABox, host: str, argv: list[str]):
        self.process = box.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the output:\n" + "\n".join(self.lines[-30:]))


def _serve(box: InternetInABox, host: str, model: str, blocks: str, *swarm: str) -> Process:
    return Process(box, host, [sys.executable, "-m", "petald.cli.main", "serve", "--model", model, "--blocks", blocks,
                               "--listen", f"/ip4/{box.address(host)}/tcp/0", *swarm, *SERVER_ARGS])


@pytest.fixture
def processes():
    """Every process a test starts, by name; on failure, pytest shows what each one said."""
    started: dict[str, Process] = {}
    yield started
    for name, process in started.items():
        print(f"--- {name}\n" + "\n".join(process.lines[-60:]))


def _swarm(box: InternetInABox, model: str, processes: dict[str, Process], *home_args: str) -> tuple[str, str, str]:
    """public1's server, public2's relay, home's server (through the relay): their addresses."""
    first = processes["public1"] = _serve(box, "public1", model, "0:3", "--new-swarm")
    first_address = first.wait_for("serving blocks").rsplit(" at ", 1)[1]
    relay = processes["relay"] = Process(box, "public2", [sys.executable, "-m", "tests.nat_nodes", "relay",
                                                          f"/ip4/{box.address('public2')}/tcp/0"])
    relay_address = relay.wait_for("relay at ").rsplit(" at ", 1)[1]
    home = processes["home"] = _serve(box, "home", model, "3:6", "--initial-peers", relay_address,
                                      "--initial-peers", first_address, *home_args)
    home.wait_for("not reachable")
    home_address = home.wait_for("serving blocks").rsplit(" at ", 1)[1]
    assert home_address.startswith(relay_address + "/p2p-circuit/p2p/"), home.lines
    return first_address, relay_address, home_address


def _client(box: InternetInABox, host: str, model: str, peer: str, mode: str, tmp_path: Path) -> Process:
    return Process(box, host, [sys.executable, "-m", "tests.nat_nodes", "generate", model, peer,
                               json.dumps(IDS[0].tolist()), str(NEW_TOKENS), mode, str(tmp_path / "pause"),
                               str(tmp_path / "go")])


def test_a_server_behind_nat_serves_through_a_relay_and_survives_the_relay_dying(tiny_models, tmp_path: Path,
                                                                                  processes):
    require_internet_in_a_box()
    model = str(tiny_models["llama"])
    expected = reference_greedy(model, IDS, NEW_TOKENS)
    with InternetInABox() as box:
        first_address, _, _ = _swarm(box, model, processes, "--no-direct-upgrade")
        pause, go = tmp_path / "pause", tmp_path / "go"
        client = processes["client"] = _client(box, "client", model, first_address, "fault", tmp_path)
        deadline = time.monotonic() + 240
        while not pause.exists():
            assert client.process.poll() is None and time.monotonic() < deadline, "\n".join(client.lines[-30:])
            time.sleep(0.1)
        processes["relay"].process.kill()  # the relay and every circuit through it: gone
        go.touch()
        result = json.loads(client.wait_for("result ", timeout=240).split(" ", 1)[1])

        assert [(a, b) for a, b, address in result["route"] if "/p2p-circuit/" in address] == [(3, 6)], result
        assert result["first"] == expected
        assert result["second"] == expected
        assert any(start <= 3 < end for start, end, _ in result["recoveries"]), result
        # The home server found another relay (public1) and announced its new circuit address.
        processes["home"].wait_for(f"reachable through relay {first_address}", timeout=60)


def test_two_homes_behind_nat_punch_a_direct_connection(tiny_models, tmp_path: Path, processes):
    require_internet_in_a_box()
    model = str(tiny_models["llama"])
    expected = reference_greedy(model, IDS, NEW_TOKENS)
    with InternetInABox(homes=("home", "home2")) as box:
        first_address, _, home_address = _swarm(box, model, processes)
        client = processes["client"] = _client(box, "home2", model, first_address, "upgrade", tmp_path)
        result = json.loads(client.wait_for("result ", timeout=300).split(" ", 1)[1])
        assert result["first"] == expected and result["second"] == expected, result
        assert [(a, b) for a, b, address in result["route"] if address == home_address] == [(3, 6)], result
        # Through the relay first; then a direct connection to the home's router, whose NAT let it in.
        assert all("/p2p-circuit" in a for a in result["connections_before"]), result
        direct = [a for a in result["connections_after"] if "/p2p-circuit" not in a]
        assert direct and all(a.startswith(f"/ip4/{box.address('home_router')}/tcp/") for a in direct), result
