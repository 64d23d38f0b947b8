"""What a node announces (never 0.0.0.0; --announce; loopback only in a loopback swarm), a listen
port held alone, and an announced address that does not answer being skipped."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import multiaddr
import pytest
import torch
import trio
from libp2p.peer.id import ID

from petald.p2pnode.transport.address_dialer import (
    DIAL_TIMEOUT_S,
    UnansweredAddresses,
    connect_first_answering,
)
from petald.p2pnode.transport.announced_addresses import (
    AddressPlan,
    AnnounceError,
    address_plan,
    host_interface_ips,
    is_loopback_swarm,
    parse_announce,
)
from petald.p2pnode.transport.host import full_addresses, local_addresses, running_host
from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of
from petald.p2pnode.transport.listen_port import PortInUse, refuse_shared_ports, refuse_taken_ports
from tests.petald_cli import invoke

PEER = "12D3KooWCbbdYC7hd6Szzfv3gY7RVNQpJXfvNszKHkBtQRNq3Szz"
OTHER_PEER = "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf"


def _ips(*texts: str) -> list:
    return [ipaddress.ip_address(t) for t in texts]


def _plan(loopback_swarm: bool, *interfaces: str, announce: tuple[str, ...] = ()) -> AddressPlan:
    return AddressPlan(announce=[parse_announce(a) for a in announce], loopback_swarm=loopback_swarm,
                       interface_ips=lambda: _ips(*interfaces))


def _texts(addresses) -> list[str]:
    return [str(a) for a in addresses]


def _bare(address: str) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(address.rsplit("/p2p/", 1)[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what is announced -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["/ip4/203.0.113.5/tcp/31337", "/ip6/2001:db8::5/tcp/31337",
                                  "/dns/example.org/tcp/443", "/dns4/example.org/tcp/1", "/dns6/example.org/tcp/2"])
def test_an_announce_address_with_a_host_and_a_tcp_port_is_taken(text):
    assert str(parse_announce(text)) == text
    assert str(parse_announce(f"{text}/p2p/{PEER}", PEER)) == text  # our own /p2p/ part: dropped, re-added


@pytest.mark.parametrize("text, why", [
    ("not an address", "is not a multiaddr"),
    ("/ip4/203.0.113.5/udp/31337", "petald announces TCP addresses"),
    ("/ip4/203.0.113.5/tcp/31337/ws", "petald announces TCP addresses"),
    ("/ip4/203.0.113.5", "petald announces TCP addresses"),
    (f"/p2p/{PEER}", "petald announces TCP addresses"),
    ("/ip4/0.0.0.0/tcp/31337", "nobody can dial 0.0.0.0"),
    ("/ip6/::/tcp/31337", "nobody can dial ::"),
    ("/ip4/203.0.113.5/tcp/0", "the real port"),
    (f"/ip4/203.0.113.5/tcp/1/p2p/{OTHER_PEER}", f"names peer {OTHER_PEER}, but this node is {PEER}"),
])
def test_an_announce_address_petald_cannot_announce_is_refused_saying_why(text, why):
    with pytest.raises(AnnounceError, match="--announce .*" + why.replace(".", r"\.")):
        address_plan(["/ip4/0.0.0.0/tcp/0"], announce=[text], peer_id=PEER)


def test_serve_refuses_a_bad_announce_before_anything_starts():
    result = invoke("serve", "--announce", "/ip4/0.0.0.0/tcp/5")
    assert result.exit_code == 2
    assert "nobody can dial 0.0.0.0" in result.stderr and "Traceback" not in result.stderr


def test_a_wildcard_is_announced_as_each_interface_address_with_the_bound_port():
    plan = _plan(False, "127.0.0.1", "10.1.2.3", "93.184.216.34", "::1", "2001:db8::7", "fe80::1", "169.254.3.3")
    bound = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/40123"), multiaddr.Multiaddr("/ip6/::/tcp/40124")]
    # Global before private; loopback and link-local gone (not a loopback swarm).
    assert _texts(plan(bound)) == ["/ip4/93.184.216.34/tcp/40123", "/ip4/10.1.2.3/tcp/40123",
                                   "/ip6/2001:db8::7/tcp/40124"]


def test_observed_addresses_follow_the_nodes_own_under_the_same_loopback_rule():
    listening = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/40123")]
    plan = _plan(False, "10.1.2.3", "127.0.0.1")
    plan.listening = lambda: listening
    observed = [multiaddr.Multiaddr("/ip4/93.184.216.99/tcp/5555"), multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/777")]
    # A global observed address still comes after a private address of our own.
    assert _texts(plan([*listening, *observed])) == ["/ip4/10.1.2.3/tcp/40123", "/ip4/93.184.216.99/tcp/5555"]


def test_loopback_is_announced_inside_a_loopback_swarm_only_and_first():
    bound = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/40123")]
    assert _texts(_plan(True, "10.1.2.3", "127.0.0.1")(bound)) == ["/ip4/127.0.0.1/tcp/40123",
                                                                     "/ip4/10.1.2.3/tcp/40123"]
    assert _texts(_plan(False, "10.1.2.3", "127.0.0.1")(bound)) == ["/ip4/10.1.2.3/tcp/40123"]
    # A host with no other address keeps loopback: it can only be in a loopback swarm.
    assert _texts(_plan(False, "127.0.0.1")(bound)) == ["/ip4/127.0.0.1/tcp/40123"]


def test_announce_replaces_the_listen_addresses():
    plan = _plan(False, "10.1.2.3", announce=("/ip4/203.0.113.5/tcp/9000", "/dns/example.org/tcp/9001"))
    assert _texts(plan([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/40123")])) == ["/ip4/203.0.113.5/tcp/9000",
                                                                             "/dns/example.org/tcp/9001"]


@pytest.mark.parametrize("listen, peers, loopback", [
    (["/ip4/127.0.0.1/tcp/0"], [], True),
    (["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"], [f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}"], True),
    (["/ip4/0.0.0.0/tcp/0"], [], False),
    (["/ip4/0.0.0.0/tcp/0"], [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", f"/ip6/::1/tcp/1/p2p/{PEER}"], True),
    (["/ip4/0.0.0.0/tcp/0"], [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}"], False),
    (["/ip4/0.0.0.0/tcp/0"], [f"/dns/localhost/tcp/1/p2p/{PEER}"], False),
])
def test_a_loopback_swarm_is_one_listening_on_loopback_only_or_joined_through_loopback_only(listen, peers, loopback):
    assert is_loopback_swarm(listen, peers) is loopback


def test_a_real_host_on_all_interfaces_announces_this_hosts_addresses_never_the_wildcard():
    key_pair = load_or_create_identity(None)
    interfaces = [ip for ip in host_interface_ips() if ip.version == 4 and not ip.is_link_local]

    async def main() -> tuple[list[str], list[str], list[str], str]:
        plan = address_plan(["/ip4/0.0.0.0/tcp/0"])
        async with running_host(key_pair, ["/ip4/0.0.0.0/tcp/0"], addresses=plan) as host:
            # What a process of this machine (the server's local API) dials: loopback, and it answers.
            async with running_host(load_or_create_identity(None)) as other:
                with trio.fail_after(10):
                    reached = await connect_first_answering(other, peer_id_of(key_pair), local_addresses(host),
                                                            UnansweredAddresses())
            return full_addresses(host), [str(a) for a in host.get_transport_addrs()], local_addresses(host), reached

    announced, bound, local, reached = trio.run(main)
    port = multiaddr.Multiaddr(bound[0]).value_for_protocol("tcp")
    assert local == [f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key_pair)}"] and reached == local[0]
    assert port != "0" and announced
    for address in announced:
        maddr = multiaddr.Multiaddr(address)
        assert maddr.value_for_protocol("tcp") == port
        assert ipaddress.ip_address(maddr.value_for_protocol("ip4")) in interfaces
        assert address.endswith(f"/p2p/{peer_id_of(key_pair)}")
    if any(not ip.is_loopback for ip in interfaces):
        assert not any("/ip4/127." in a for a in announced)


# --- a listen port held alone ------------------------------------------------------------------

def test_a_port_another_petald_node_listens_on_is_refused():
    key_pair = load_or_create_identity(None)

    async def main() -> None:
        async with running_host(key_pair, ["/ip4/127.0.0.1/tcp/0"]) as first:
            port = first.get_transport_addrs()[0].value_for_protocol("tcp")
            with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
                async with running_host(load_or_create_identity(None), [f"/ip4/127.0.0.1/tcp/{port}"]):
                    pass
            # The first node is unharmed: a new host still reaches it.
            async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as other:
                with trio.fail_after(10):
                    await connect_first_answering(other, first.get_id().to_base58(), full_addresses(first),
                                                  UnansweredAddresses())

    trio.run(main)


@pytest.mark.parametrize("listen_ip", ["127.0.0.1", "0.0.0.0"])
def test_a_port_a_foreign_program_listens_on_is_refused(listen_ip):
    # (tests/test_cli.py: the same through ``petald serve``.)
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on {listen_ip} is already in use"):
            refuse_taken_ports([f"/ip4/{listen_ip}/tcp/{port}"])


def test_the_daemon_refuses_a_port_in_use_before_opening_its_model(tmp_path):
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        result = invoke("daemon", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", "--socket",
                        str(tmp_path / "api.sock"), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"petald: error: port {port} on 127.0.0.1 is already in use (another petald, or "
                             "another program): choose another --listen port, or stop what holds it\n")


def test_a_port_bound_twice_in_the_same_instant_is_refused_after_binding():
    # Two SO_REUSEPORT listeners, as two petald nodes would hold after passing their probes together.
    sockets = [socket.socket() for _ in range(2)]
    try:
        for s in sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sockets[0].bind(("127.0.0.1", 0))
        port = sockets[0].getsockname()[1]
        sockets[0].listen()
        refuse_shared_ports([f"/ip4/127.0.0.1/tcp/{port}"])  # alone on it: fine
        sockets[1].bind(("127.0.0.1", port))
        sockets[1].listen()
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1"):
            refuse_shared_ports([f"/ip4/127.0.0.1/tcp/{port}"])
    finally:
        for s in sockets:
            s.close()


def test_a_free_fixed_port_is_taken_and_its_old_connections_do_not_block_a_restart():
    key_pair = load_or_create_identity(None)
    port = _free_port()

    async def run_once() -> list[str]:
        async with running_host(key_pair, [f"/ip4/127.0.0.1/tcp/{port}"]) as server:
            # One real connection, so that closing leaves the port with a connection in TIME_WAIT.
            async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as client:
                with trio.fail_after(10):
                    await connect_first_answering(client, server.get_id().to_base58(), full_addresses(server),
                                                  UnansweredAddresses())
            return full_addresses(server)

    assert trio.run(run_once) == [f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key_pair)}"]
    assert trio.run(run_once)  # the same port again at once


# --- an announced address that does not answer -------------------------------------------------

def test_unanswered_addresses_are_skipped_for_a_while_and_bounded():
    now = [0.0]
    memory = UnansweredAddresses(skip_for=60.0, capacity=3, clock=lambda: now[0])
    memory.remember("a")
    assert memory.skips("a") and not memory.skips("b")
    now[0] = 59.0
    assert memory.skips("a")
    now[0] = 60.0
    assert not memory.skips("a") and len(memory) == 0  # time is up: tried again
    for name in "abcde":
        memory.remember(name)
    assert len(memory) == 3 and not memory.skips("a") and memory.skips("e")  # the oldest went first


class SilentListener:
    """A port that accepts TCP connections and never says a word (a host that swallows the
    handshake), counting the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()


def test_an_address_that_does_not_answer_is_passed_over_then_not_dialled_again():
    silent = SilentListener()
    closed = _free_port()  # nothing listens there: refused at once
    try:
        async def main() -> None:
            async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as server:
                peer = server.get_id().to_base58()
                good = full_addresses(server)[0]
                dead = [f"/ip4/127.0.0.1/tcp/{silent.port}/p2p/{peer}", f"/ip4/127.0.0.1/tcp/{closed}/p2p/{peer}"]
                memory = UnansweredAddresses()
                for _ in range(2):
                    async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as client:
                        # What a DHT lookup leaves in the peerstore: the record's addresses, dead first.
                        client.get_peerstore().add_addrs(ID.from_base58(peer), [_bare(a) for a in dead], 600)
                        with trio.fail_after(10):
                            used = await connect_first_answering(client, peer, [*dead, good], memory, dial_timeout=1.0)
                        # py-libp2p's own later dials start from the address that answered; the dead are gone.
                        known = [str(a) for a in client.get_peerstore().addrs(ID.from_base58(peer))]
                        assert known == [str(_bare(good))]
                    assert used == good
                    assert all(memory.skips(a) for a in dead)
                # The silent port was dialled once, not twice: the second connect went straight to the
                # good address (how long each took is not asserted: the machine may be loaded).
                assert len(silent.accepted) == 1

        trio.run(main)
    finally:
        silent.close()


def test_an_address_that_did_not_answer_is_still_tried_when_no_other_answers():
    async def main() -> None:
        async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as server:
            peer, (good,) = server.get_id().to_base58(), full_addresses(server)
            dead = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{peer}"
            memory = UnansweredAddresses()
            memory.remember(good)  # it failed once, in a slow moment
            async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as client:
                with trio.fail_after(10):
                    assert await connect_first_answering(client, peer, [good, dead], memory) == good
            assert not memory.skips(good) and memory.skips(dead)  # it answered: forgotten
            async with running_host(load_or_create_identity(None), ["/ip4/127.0.0.1/tcp/0"]) as client:
                with pytest.raises(ConnectionError, match=f"no address of ..{peer[-8:]} answered: {dead}: "):
                    await connect_first_answering(client, peer, [dead], memory)

    trio.run(main)


def test_the_dial_timeout_is_explicit():
    assert 0 < DIAL_TIMEOUT_S <= 10


@pytest.mark.slow
def test_a_server_whose_first_announced_address_is_dead_is_used_through_the_second(tiny_models):
    from petald.cli.local_swarm import LocalSwarm
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.p2pnode.client.remote_span import fetch_info
    from tests.oracle import reference_logits

    model = str(tiny_models["llama"])
    port, dead_port = _free_port(), _free_port()  # nothing listens on dead_port: a closed port
    dead, good = f"/ip4/127.0.0.1/tcp/{dead_port}", f"/ip4/127.0.0.1/tcp/{port}"
    args = ["--threads", "1", "--listen", good, "--announce", dead, "--announce", good]
    with LocalSwarm(["0:6"], model=model, extra_args=args) as swarm:
        server = swarm.servers[0]
        deadline = time.monotonic() + 30  # a server is ready at its first "serving" line
        while len(lines := [line for line in server.output if "serving blocks" in line]) < 2:
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        announced = [line.split(" at ")[1] for line in lines]  # what its record says, in order
        assert [a.split("/p2p/")[0] for a in announced] == [dead, good]
        peer = announced[0].rsplit("/p2p/", 1)[1]

        async def dial_twice() -> None:
            # The closed port is refused once, then remembered: the second connect tries the good
            # address first (what it costs is not asserted here: the machine may be loaded).
            memory = UnansweredAddresses()
            for _ in range(2):
                async with running_host(load_or_create_identity(None)) as host:
                    with trio.fail_after(DIAL_TIMEOUT_S):
                        assert await connect_first_answering(host, peer, announced, memory) == announced[1]
                    assert (await fetch_info(host, peer, 10.0)).end == 6  # a real exchange through it
                assert memory.skips(announced[0])

        trio.run(dial_twice)
        with DistributedModel(model=model, initial_peers=[announced[1]], wire="float32") as client:
            assert [s.address for s in client.servers] == [announced[1]]
            ids = torch.tensor([[5, 17, 42, 99]])
            logits = client.forward(ids)
    torch.testing.assert_close(logits, reference_logits(model, ids), atol=1e-4, rtol=1e-4)
