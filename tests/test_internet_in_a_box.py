"""The internet in a box itself: who reaches whom, what the NAT does to addresses, and that it
cleans up after itself. Every connection here is a real TCP connection between namespaces."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.internet_in_a_box import (
    InternetInABox,
    require_internet_in_a_box,
    why_no_internet_in_a_box,
)

# Listens on ADDRESS (port 0), prints its port, then answers each connection with the address it
# came from, or (with a byte count as the 2nd argument) with that many bytes.
TELL_PEER = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, (peer, _) = server.accept()
    with conn:
        conn.sendall(b"x" * int(sys.argv[2]) if len(sys.argv) > 2 else peer.encode())
"""
# Connects to ADDRESS PORT (giving up after TIMEOUT seconds) and prints what it reads until the other
# end closes, or (with "count") how many bytes; "refused" or "timeout" when it cannot connect.
DIAL = """
import socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except ConnectionRefusedError:
    sys.exit(print("refused"))
except (TimeoutError, socket.timeout):
    sys.exit(print("timeout"))
conn.settimeout(60)
data = b""
while chunk := conn.recv(1 << 16):
    data += chunk
print(len(data) if len(sys.argv) > 4 else data.decode())
"""


@pytest.fixture(scope="module")
def box():
    require_internet_in_a_box()
    with InternetInABox() as box:
        yield box


def listen(box: InternetInABox, host: str, address: str | None = None, size: int | None = None) -> int:
    """Start TELL_PEER on ``host`` (on its own address unless told); returns its port."""
    argv = [sys.executable, "-c", TELL_PEER, address or box.address(host)] + ([str(size)] if size else [])
    process = box.popen(host, argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return int(process.stdout.readline())


def dial(box: InternetInABox, host: str, address: str, port: int, *extra: str, timeout: float = 5.0) -> str:
    result = box.run(host, [sys.executable, "-c", DIAL, address, str(port), str(timeout), *extra],
                     capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_host_has_loopback_and_its_address(box):
    for host in ("public1", "public2", "client", "home_router", "home"):
        port = listen(box, host, "127.0.0.1")
        assert dial(box, host, "127.0.0.1", port) == "127.0.0.1"
    assert box.address("public1") != box.address("public2")
    assert box.address("home").startswith("192.168.")


def test_public_hosts_reach_each_other_and_home_dials_out(box):
    port = listen(box, "public1")
    for host in ("public2", "client"):
        assert dial(box, host, box.address("public1"), port) == box.address(host)
    assert dial(box, "home", box.address("public1"), port) != "timeout"


def test_nat_rewrites_a_home_connection_to_the_routers_wan_address(box):
    port = listen(box, "public2")
    assert dial(box, "home", box.address("public2"), port) == box.address("home_router")


def test_the_internet_cannot_dial_into_the_home(box):
    port = listen(box, "home", "0.0.0.0")
    # the home does listen: its own router (on the LAN side) reaches it
    assert dial(box, "home_router", box.address("home"), port) == "192.168.1.1"
    # the router's public address has no port forwarding: new connections are dropped, not refused
    # (a handshake in the box takes well under a millisecond: 1 s is ample)
    assert dial(box, "public1", box.address("home_router"), port, timeout=1) == "timeout"
    # even a neighbour on the internet that routes the LAN through the router gets nothing through
    box.run("public2", ["ip", "route", "add", "192.168.1.0/24", "via", box.address("home_router")], check=True)
    assert dial(box, "public2", box.address("home"), port, timeout=1) == "timeout"


def test_bandwidth_cap_slows_a_transfer(box):
    """1 MB through a 4 Mbit/s cap takes at least ~2 s (a lower bound: load cannot make it faster),
    while the uncapped link in the same run takes a fraction of that."""
    size, mbps = 1_000_000, 4.0
    port = listen(box, "public1", size=size)
    started = time.monotonic()
    assert dial(box, "public2", box.address("public1"), port, "count") == str(size)
    uncapped = time.monotonic() - started
    box.limit_bandwidth("client", mbps)
    started = time.monotonic()
    assert dial(box, "client", box.address("public1"), port, "count") == str(size)
    capped = time.monotonic() - started
    assert capped >= 0.9 * size * 8 / (mbps * 1e6)
    assert capped > 2 * uncapped, (capped, uncapped)


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_second_home_and_cleanup_after_a_failure():
    require_internet_in_a_box()
    with pytest.raises(RuntimeError, match="inside the box"):
        with InternetInABox(publics=("public1",), homes=("home", "home2")) as box:
            ours = {box.namespace(host) for host in box.hosts} | {box.prefix + "internet"}
            assert ours <= _namespaces()
            sleeper = box.popen("home2", ["sleep", "60"])
            port = listen(box, "public1")
            assert dial(box, "home2", box.address("public1"), port) == box.address("home2_router")
            raise RuntimeError("a failure inside the box")
    assert sleeper.poll() is not None
    assert not ours & _namespaces()  # (other runs' boxes may come and go meanwhile)


def test_bad_host_names_are_refused_and_a_failed_build_leaves_nothing():
    require_internet_in_a_box()
    with InternetInABox(publics=("public1",), homes=()) as box:
        for name in ("public1", "internet", "Bad-Name"):
            with pytest.raises(ValueError, match="host name"):
                box.add_public(name)
        with pytest.raises(KeyError):
            box.address("nobody")
    for half_built, message in [
        (InternetInABox(publics=("public1", "public2"), homes=("home", "Home2")), "host name 'Home2'"),
        (InternetInABox(bandwidth_mbps={"home": 0}), "bandwidth cap for home: 0 is not a positive number"),
    ]:
        with pytest.raises(ValueError, match=message):
            half_built.__enter__()
        assert not any(name.startswith(half_built.prefix) for name in _namespaces())


def test_where_the_box_cannot_be_built_the_reason_says_what_is_missing():
    assert why_no_internet_in_a_box(euid=1000) == "the internet in a box needs root (network namespaces, veths, " \
                                                  "nftables)"
    no_nft = why_no_internet_in_a_box(euid=0, which=lambda tool: None if tool == "nft" else f"/usr/sbin/{tool}")
    assert no_nft == "the internet in a box needs `nft`: apt-get install -y nftables"


def test_boxes_of_killed_runs_are_swept():
    require_internet_in_a_box()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names a process that no longer runs
    orphan = f"ibox{gone.pid}n0-internet"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        with InternetInABox(publics=(), homes=()):
            assert orphan not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", orphan], capture_output=True)


@pytest.mark.slow
def test_swarm_across_namespaces(tmp_path):
    """A server on public1 listening on all interfaces (it announces its public address), and one on
    public2 that listens on its loopback behind a 25 ms delay proxy and announces the proxy's address
    (the WAN benchmark's shape); a client on a third host that knows only public1's address finds
    public2 through the DHT and generates the oracle's greedy tokens (float32 on the wire, so
    exactly); so does a client at home, behind the NAT. A tiny random Llama with SmolLM2's tokenizer
    keeps it fast."""
    require_internet_in_a_box()
    from petald.kernels.sources.open_source import open_source
    from tests.oracle import reference_text
    from tests.petald_cli import PETALD
    from tests.swarm_in_a_box import start_server, start_server_behind_delay
    from tests.tiny_models import save_tiny_chat_model

    model = str(save_tiny_chat_model(tmp_path / "tiny-chat"))
    prompt, new_tokens = "The capital of France is", 12
    ids = open_source(model).load_tokenizer()(prompt, return_tensors="pt").input_ids
    with InternetInABox() as box:
        first = start_server(box, "public1", "0:3", ["--new-swarm", "--model", model], listen="/ip4/0.0.0.0/tcp/0")
        assert first.address.startswith(f"/ip4/{box.address('public1')}/tcp/")
        second = start_server_behind_delay(box, "public2", "3:6", ["--initial-peers", first.address, "--model", model],
                                           delay_ms=25)
        assert second.address.startswith(f"/ip4/{box.address('public2')}/tcp/31337/p2p/")  # the proxy's
        generate = [*PETALD, "generate", prompt, "--model", model, "--initial-peers", first.address,
                    "--max-new-tokens", str(new_tokens), "--temperature", "0", "--wire", "float32"]
        # the client on a public host, and one at home behind the NAT (it only dials out)
        results = {host: box.run(host, generate, capture_output=True, text=True, timeout=300)
                   for host in ("client", "home")}
    expected = reference_text(model, ids, new_tokens) + "\n"
    for host, result in results.items():
        assert result.returncode == 0, (host, result.stderr)
        assert result.stdout == expected, host


def test_a_delay_proxy_puts_a_host_farther_away(box):
    """A service on public2's loopback, reachable only through the proxy on public2's address: its
    answer reaches the client one delay later (the dial itself is not delayed: the proxy accepts at once)."""
    from tests.swarm_in_a_box import start_delay_proxy

    hidden = listen(box, "public2", "127.0.0.1")
    proxied = start_delay_proxy(box, "public2", ("127.0.0.1", hidden), delay_ms=300)
    started = time.monotonic()
    assert dial(box, "client", box.address("public2"), proxied) == "127.0.0.1"  # the proxy's leg to the service
    assert time.monotonic() - started >= 0.3
    assert dial(box, "client", box.address("public2"), hidden) == "refused"  # not reachable around the proxy
