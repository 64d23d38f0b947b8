"""benchmarks/delay_proxy.py: the delay it adds (lower bounds, and differences taken side by side
in one run, so load cannot fake or flake them), bytes and order over a large transfer, the cap, and
what happens when either side goes away. Everything runs on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.delay_proxy import DelayProxy, Link, parse_host_port

PROXY_SCRIPT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "delay_proxy.py")


@contextmanager
def upstream_server(handle):
    """A TCP server on 127.0.0.1 that runs ``handle(conn)`` on a thread per connection."""
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()
    finally:
        server.close()


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def best_round_trip(port: int, rounds: int = 5) -> float:
    """The fastest of ``rounds`` one-byte round trips (load only ever adds to a round trip)."""
    with connect(port) as conn:
        times = []
        for _ in range(rounds):
            started = time.monotonic()
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
            times.append(time.monotonic() - started)
    return min(times)


def test_round_trip_is_both_delays_more_than_without_the_proxy():
    with upstream_server(echo) as to, DelayProxy(to, 0.0) as plain, DelayProxy(to, 0.05) as delayed, \
            DelayProxy(to, 0.06, back_delay=0.01) as uneven:
        base, rtt, rtt_uneven = best_round_trip(plain.port), best_round_trip(delayed.port), best_round_trip(uneven.port)
    assert rtt >= 0.1 and rtt_uneven >= 0.07
    # side by side: the proxy's own cost (base) aside, the delay is what was asked, within 40 ms
    assert rtt - base < 0.1 + 0.04, (rtt, base)
    assert rtt_uneven - base < 0.07 + 0.04, (rtt_uneven, base)


def test_each_direction_gets_its_own_delay():
    """The server stamps each message's arrival, so each leg is measured alone (one clock: one process)."""
    arrivals: list[float] = []

    def stamp(conn: socket.socket) -> None:
        with conn:
            while conn.recv(8):
                arrivals.append(time.monotonic())
                conn.sendall(struct.pack("d", time.monotonic()))

    with upstream_server(stamp) as to, DelayProxy(to, 0.06, back_delay=0.02) as proxy, connect(proxy.port) as conn:
        forward, back = [], []
        for _ in range(3):
            sent = time.monotonic()
            conn.sendall(b"12345678")
            (answered,) = struct.unpack("d", conn.recv(8))
            back.append(time.monotonic() - answered)
            forward.append(arrivals[-1] - sent)
    assert 0.06 <= min(forward) < 0.06 + 0.04, forward
    assert 0.02 <= min(back) < 0.02 + 0.04, back


def test_large_transfer_keeps_every_byte_in_order():
    payload = os.urandom(8 << 20)
    with upstream_server(echo) as to, DelayProxy(to, 0.005) as proxy, connect(proxy.port) as conn:
        writer = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        writer.start()
        received = hashlib.sha256()
        count = 0
        while chunk := conn.recv(1 << 16):
            received.update(chunk)
            count += len(chunk)
        writer.join()
    # the echo server saw the end of the request only after every byte, and closed after echoing it
    assert count == len(payload) and received.digest() == hashlib.sha256(payload).digest()


def test_bandwidth_cap_paces_a_transfer():
    """500 KB at 8 Mbit/s needs at least 0.5 s (a lower bound); uncapped, the same run takes less."""
    size = 500_000

    def send_block(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"y" * size)

    def fetch(port: int) -> float:
        started = time.monotonic()
        with connect(port) as conn:
            count = 0
            while chunk := conn.recv(1 << 16):
                count += len(chunk)
        assert count == size
        return time.monotonic() - started

    with upstream_server(send_block) as to, DelayProxy(to, 0.0) as plain, DelayProxy(to, 0.0, mbps=8) as capped:
        uncapped_time, capped_time = fetch(plain.port), fetch(capped.port)
    assert capped_time >= 0.95 * size * 8 / 8e6
    assert capped_time > 2 * uncapped_time, (capped_time, uncapped_time)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_vanished_server_closes_the_client_leg(how):
    def vanish(conn: socket.socket) -> None:
        conn.recv(1)
        if how == "reset":  # linger 0: close sends RST, as a killed machine's peer sees it
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    with upstream_server(vanish) as to, DelayProxy(to, 0.01) as proxy, connect(proxy.port) as conn:
        conn.sendall(b"x")
        if how == "reset":  # passed on as a reset
            with pytest.raises(ConnectionResetError):
                conn.recv(1)
        else:
            assert conn.recv(1) == b""


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_vanished_client_closes_the_server_leg(how):
    seen: list[bytes] = []
    done = threading.Event()

    def wait_for_end(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                seen.append(conn.recv(1))
                seen.append(conn.recv(1))
            except ConnectionResetError:
                seen.append(b"reset")
        done.set()

    with upstream_server(wait_for_end) as to, DelayProxy(to, 0.01) as proxy:
        conn = connect(proxy.port)
        conn.sendall(b"x")
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        assert done.wait(30)
    assert seen == [b"x", b"reset" if how == "reset" else b""]  # the data first, then the close as it was


def test_process_says_ready_and_stops_cleanly_on_sigterm_with_a_connection_open():
    with upstream_server(echo) as (host, port):
        proxy = subprocess.Popen([sys.executable, PROXY_SCRIPT, "--listen", "127.0.0.1:0", "--to", f"{host}:{port}",
                                  "--delay-ms", "25", "--mbps", "100"], stdout=subprocess.PIPE, text=True)
        try:
            ready = proxy.stdout.readline()
            assert ready.startswith("delay proxy ready at 127.0.0.1:"), ready
            assert ready.endswith(f" -> {host}:{port}, 25 ms forward and 25 ms back, capped at 100 Mbit/s\n")
            listening = parse_host_port(ready.split()[4])
            with connect(listening[1]) as conn:
                conn.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                proxy.send_signal(signal.SIGTERM)
                assert proxy.wait(15) == 0
                assert proxy.stdout.read() == "delay proxy stopped\n"
                assert conn.recv(1) == b""  # the open connection was closed, not left hanging
        finally:
            proxy.kill()
            proxy.wait()


def test_closing_the_importable_proxy_ends_its_thread_and_connections():
    with upstream_server(echo) as to:
        proxy = DelayProxy(to, 0.01).__enter__()
        with connect(proxy.port) as conn:
            conn.sendall(b"a")
            assert conn.recv(1) == b"a"
            proxy.close()
            assert not proxy.running
            assert conn.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.port)


@pytest.mark.parametrize("args, message", [
    (["--listen", "nowhere", "--to", "127.0.0.1:1", "--delay-ms", "5"], "'nowhere': expected HOST:PORT"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:99999", "--delay-ms", "5"], "'127.0.0.1:99999': expected"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--delay-ms", "-1"], "delay must be a finite number"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--delay-ms", "5", "--mbps", "0"], "bandwidth cap must be"),
])
def test_bad_arguments_are_refused_with_a_sentence(args, message):
    result = subprocess.run([sys.executable, PROXY_SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_port_in_use_is_a_sentence():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, PROXY_SCRIPT, "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:1",
                                 "--delay-ms", "5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"delay proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_link_refuses_nonsense():
    with pytest.raises(ValueError):
        Link(float("nan"))
    with pytest.raises(ValueError):
        Link(0.01, mbps=-5)
