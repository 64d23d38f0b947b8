"""Private swarms (``--swarm-key``): the key file, the XSalsa20 wrapper, real libp2p hosts with
and without the key (direct and through a relay), and real ``petald serve`` processes that a
client with the key uses and one without it (or with another) cannot reach."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.secret
import pytest
import torch
import trio
from click.testing import Result
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.tools.anyio_service import background_trio_service

from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.swarm.membership import (
    InvalidMemberList,
    MemberListValidator,
    SwarmMembership,
    member_list_key,
    parse_owner,
    sign_member_list,
    verify_member_list,
)
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.host import full_addresses, parse_peer_address, running_host
from petald.p2pnode.transport.identity import load_or_create_identity, peer_id_of
from petald.p2pnode.transport.private_network import (
    KEY_CHECK_TIMEOUT_S,
    PrivateConnection,
    describe_connect_failure,
    xsalsa20,
)
from petald.p2pnode.transport.relay_client import RelayRefused, circuit_address, reserve
from petald.p2pnode.transport.relay_service import RelayService
from petald.p2pnode.transport.swarm_key import (
    SwarmKey,
    SwarmKeyError,
    read_swarm_key,
    write_new_swarm_key,
)
from petald.protocol.errors import ErrorCode, ProtocolError, RemoteError
from petald.protocol.member_list import MemberList
from tests.oracle import reference_greedy
from tests.petald_cli import invoke

ECHO = TProtocol("/petald-test/echo/1.0.0")
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_xsalsa20_is_libsodiums():
    """Our XSalsa20 (HSalsa20 in Python, then pycryptodome's Salsa20) against libsodium's: a
    secretbox is Poly1305 keyed by the stream's first 32 bytes, then the text XOR-ed with the rest."""
    for seed in range(4):
        key, nonce = os.urandom(32), os.urandom(24)
        text = os.urandom(100 + 997 * seed)
        box = nacl.secret.SecretBox(key).encrypt(text, nonce).ciphertext
        stream = xsalsa20(key, nonce)
        stream.encrypt(bytes(32))
        assert stream.encrypt(text[:7]) + stream.encrypt(text[7:]) == box[16:]  # stateful across writes


def test_swarm_key_file_is_written_once_private_and_read_back(tmp_path):
    path = tmp_path / "swarm.key"
    key = write_new_swarm_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines()[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"]
    assert read_swarm_key(path) == key and key.secret.hex() not in repr(key)
    with pytest.raises(SwarmKeyError, match="already exists: a swarm key is never overwritten"):
        write_new_swarm_key(path)
    assert read_swarm_key(path) == key  # untouched
    for text, message in [("hello", "is not a swarm key file"),
                          ("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n", "must be 64 hex digits"),
                          ("/key/swarm/psk/1.0.0/\n/base64/\n" + "0" * 64, "is not a swarm key file")]:
        (tmp_path / "bad").write_text(text)
        with pytest.raises(SwarmKeyError, match=message):
            read_swarm_key(tmp_path / "bad")
    with pytest.raises(SwarmKeyError, match="does not exist \\(petald swarm-key .* makes one\\)"):
        read_swarm_key(tmp_path / "missing")


def test_swarm_key_command_and_option(tmp_path):
    path = tmp_path / "k"
    result = invoke("swarm-key", str(path))
    assert result.exit_code == 0 and "wrote a new swarm key" in result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = invoke("swarm-key", str(path))
    assert again.exit_code == 1 and "already exists" in again.stderr
    (tmp_path / "bad").write_text("not a key")
    for args, env in [(["--swarm-key", str(tmp_path / "bad")], None), ([], {"PETALD_SWARM_KEY": str(tmp_path / "bad")})]:
        refused = invoke("generate", "hi", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/" + "1" * 46, *args, env=env)
        assert refused.exit_code == 2 and "--swarm-key" in refused.stderr and "is not a swarm key file" in refused.stderr


async def _echo(stream) -> None:
    framed = FramedStream(stream)
    while (msg := await framed.receive()) is not None:
        await framed.send({"type": "echo", "n": msg["n"], "pad": msg["pad"]})


async def _round_trip(host, peer) -> None:
    framed = FramedStream(await host.new_stream(peer, [ECHO]))
    pad = os.urandom(200_000)  # several yamux frames and reads: the stream state carries over
    await framed.send({"type": "ping", "n": 7, "pad": pad})
    assert await framed.receive() == {"type": "echo", "n": 7, "pad": pad}
    await framed.stream.close()


def _private_secured(host, peer) -> bool:
    """Whether ``host``'s connection to ``peer`` runs inside the swarm key."""
    conn = host.get_network().get_connections(peer)[0]
    return isinstance(conn.muxed_conn.secured_conn.conn.read_writer.read_write_closer, PrivateConnection)


def test_hosts_with_the_key_talk_and_others_are_refused_within_seconds():
    one, other = SwarmKey(os.urandom(32)), SwarmKey(os.urandom(32))

    async def main():
        async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=one) as server:
            server.set_stream_handler(ECHO, _echo)
            info = parse_peer_address(full_addresses(server)[0])
            with trio.fail_after(20):
                async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=one) as member:
                    await member.connect(info)
                    await _round_trip(member, server.get_id())
                    assert _private_secured(member, server.get_id())
            for key, said in [(None, "likely in a private swarm, whose nodes need its key (--swarm-key FILE)"),
                              (other, "holds another swarm key")]:
                async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as stranger:
                    began = trio.current_time()
                    with pytest.raises(SwarmException) as refused:
                        with trio.fail_after(15):
                            await stranger.connect(info)
                    assert trio.current_time() - began < 8  # the library's 3 retries included
                    assert said in describe_connect_failure(stranger, refused.value)
                    assert not stranger.get_network().get_connections(server.get_id())
        # A node with the key cannot reach a node without one either, and says why.
        async with running_host(create_new_key_pair(), LOOPBACK) as public, \
                running_host(create_new_key_pair(), LOOPBACK, swarm_key=one) as member:
            with pytest.raises(SwarmException) as refused:
                with trio.fail_after(15):
                    await member.connect(parse_peer_address(full_addresses(public)[0]))
            assert "has no swarm key" in describe_connect_failure(member, refused.value)

    trio.run(main)


@contextlib.asynccontextmanager
async def _relay(key: SwarmKey | None) -> AsyncIterator:
    async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as relay:
        async with background_trio_service(RelayService(relay, offer_hop=True)):
            yield relay


def test_relays_apply_the_key():
    """A keyed relay carries the swarm's circuits (the circuit inside the key end to end); a relay
    without the key cannot even reach a member to relay for it; a keyed relay refuses strangers."""
    key = SwarmKey(os.urandom(32))

    async def main():
        with trio.fail_after(60):
            async with _relay(key) as relay, running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as relayed, \
                    running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as caller:
                async with background_trio_service(RelayService(relayed, offer_hop=False)):
                    relayed.set_stream_handler(ECHO, _echo)
                    relay_address = full_addresses(relay)[0]
                    await relayed.connect(parse_peer_address(relay_address))
                    await reserve(relayed, relay.get_id())
                    circuit = circuit_address(relay_address, relayed.get_id())
                    caller.get_peerstore().add_addrs(relayed.get_id(), [parse_peer_address(circuit).addrs[0]], 60)
                    await _round_trip(caller, relayed.get_id())
                    assert "/p2p-circuit" in str(caller.get_network().get_connections(relayed.get_id())[0]
                                                 .muxed_conn.secured_conn.conn.read_writer.read_write_closer
                                                 .get_transport_addresses())
                    assert _private_secured(caller, relayed.get_id())
                    async with running_host(create_new_key_pair(), LOOPBACK) as stranger:
                        with pytest.raises(SwarmException):
                            await stranger.connect(parse_peer_address(relay_address))
                        with pytest.raises((SwarmException, RelayRefused)):
                            await reserve(stranger, relay.get_id())
            async with _relay(None) as open_relay, \
                    running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as member:
                with pytest.raises(SwarmException) as refused:
                    await member.connect(parse_peer_address(full_addresses(open_relay)[0]))
                assert "has no swarm key" in describe_connect_failure(member, refused.value)

    trio.run(main)


@dataclass
class PrivateSwarm:
    """Two ``petald serve`` processes of one private swarm with a member list (``--swarm-key``,
    ``--swarm-owner``, a 1 s announce period): ``member`` serves 0:6 and is on the list,
    ``stranger`` serves 0:6 with the key but is not."""

    swarm: LocalSwarm
    key: SwarmKey
    owner: str  # the owner's peer ID
    files: Path  # swarm.key, owner.key, and the identities: member.id, stranger.id, client.id, other.id
    model: str

    def peer(self, name: str) -> str:
        return peer_id_of(load_or_create_identity(self.files / f"{name}.id"))

    def client(self, name: str, **settings) -> DistributedModel:
        return DistributedModel(model=self.model, initial_peers=self.swarm.addresses[:1], swarm_key=self.key,
                                swarm_owner=self.owner, identity_file=str(self.files / f"{name}.id"), **settings)

    def members(self, *args: str) -> Result:
        return invoke("swarm-members", *args, "--initial-peers", self.swarm.addresses[0],
                      "--swarm-key", str(self.files / "swarm.key"))


@pytest.fixture(scope="module")
def private_swarm(tiny_models, tmp_path_factory) -> Iterator[PrivateSwarm]:
    files = tmp_path_factory.mktemp("private")
    key = write_new_swarm_key(files / "swarm.key")
    owner = invoke("swarm-owner-key", str(files / "owner.key")).stdout.strip()
    for name in ("member", "stranger", "client", "other"):
        load_or_create_identity(files / f"{name}.id")
    path = str(tiny_models["llama"])
    with LocalSwarm(["0:6", "0:6"], model=path, server_args=[["--identity", str(files / "member.id")],
                                                             ["--identity", str(files / "stranger.id")]],
                    extra_args=["--threads", "1", "--swarm-key", str(files / "swarm.key"), "--swarm-owner",
                                str(files / "owner.key.pub"), "--announce-period", "1"]) as swarm:
        yield PrivateSwarm(swarm, key, owner, files, path)


@pytest.mark.slow
def test_a_private_swarm_of_processes_serves_key_holders_only(private_swarm):
    """A client with another key is refused naming the key, and ``petald generate`` without a key
    ends with one line that says the swarm is private (no traceback)."""
    swarm = private_swarm.swarm
    with pytest.raises(ConnectionError, match="none of the initial peers answered: .* \\(the peer holds another swarm key"):
        DistributedModel(model=private_swarm.model, initial_peers=swarm.addresses[:1], swarm_key=SwarmKey(os.urandom(32)))
    # The command line in this process (a process of its own costs ~10-25 s of imports here).
    result = invoke("generate", "hi", "--model", private_swarm.model, "--initial-peers", swarm.addresses[0],
                    "--no-daemon")
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("petald: error")]
    assert len(errors) == 1, result.stderr
    assert "likely in a private swarm, whose nodes need its key (--swarm-key FILE)" in errors[0]


@pytest.mark.slow
def test_members_are_served_others_refused_and_a_removed_member_is_shut_out(private_swarm):
    """The owner's signed list admits the member server and the client: the client ignores the
    stranger server's record and generates the oracle's tokens; a client with the key that is not
    on the list is refused (not_member); once the owner removes the client, the server closes its
    connection within announce periods and its next generation is refused."""
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    added = private_swarm.members("add", private_swarm.peer("member"), private_swarm.peer("client"),
                                  "--owner-key", str(private_swarm.files / "owner.key"))
    assert added.exit_code == 0, added.output
    listed = private_swarm.members("list", "--swarm-owner", private_swarm.owner)
    assert listed.stdout.splitlines()[0].startswith("version 1, signed ") and "2 members" in listed.stdout
    assert sorted(listed.stdout.splitlines()[1:]) == sorted([private_swarm.peer("member"), private_swarm.peer("client")])
    with private_swarm.client("client", wire="float32") as model:
        assert [s.peer_id for s in model.servers] == [private_swarm.peer("member")]  # the stranger's record ignored
        expected = reference_greedy(private_swarm.model, ids, 6)
        assert model.generate(ids, max_new_tokens=6, eos_token_id=[])[0, 12:].tolist() == expected
        with pytest.raises(RemoteError, match="not_member: peer .* is not on the swarm owner's member list"):
            private_swarm.client("other")
        removed = private_swarm.members("remove", private_swarm.peer("client"),
                                        "--owner-key", str(private_swarm.files / "owner.key"))
        assert removed.exit_code == 0, removed.output
        server = private_swarm.swarm.servers[0]
        deadline = time.monotonic() + 15  # announce periods of 1 s, on a loaded machine
        while not any("was removed from the swarm's member list" in line for line in server.output):
            assert time.monotonic() < deadline, "\n".join(server.output[-10:])
            time.sleep(0.2)
        with pytest.raises(RemoteError, match="not_member"):
            model.generate(ids, max_new_tokens=2, eos_token_id=[])


def test_member_lists_are_checked_and_only_newer_ones_taken(tmp_path):
    owner_key, intruder_key = create_new_key_pair(), create_new_key_pair()
    owner = peer_id_of(owner_key)
    a, b = peer_id_of(create_new_key_pair()), peer_id_of(create_new_key_pair())
    first = sign_member_list(MemberList(owner, 1, time.time(), (a, b, a)), owner_key)
    assert verify_member_list(first, owner).members == tuple(sorted({a, b}))
    forged = sign_member_list(MemberList(owner, 9, time.time(), (a,)), intruder_key)  # claims the owner
    mislabelled = sign_member_list(MemberList(peer_id_of(intruder_key), 9, time.time(), (a,)), intruder_key)
    future = sign_member_list(MemberList(owner, 9, time.time() + 3600, (a,)), owner_key)
    for bad, said in [(forged, "not signed by the owner"), (mislabelled, "not signed by the owner"),
                      (future, "issued in the future"), (b"\x81\xa4type\xa4nope", "malformed"),
                      (first[:-3], "malformed")]:
        with pytest.raises(InvalidMemberList, match=said):
            verify_member_list(bad, owner)
    with pytest.raises(ProtocolError, match="at most 4096 peer IDs"):
        MemberList.from_bytes(msgpack.packb({"type": "member_list", "owner": owner, "version": 1, "issued_at": 1.0,
                                             "members": [7]}))
    members = SwarmMembership(owner)
    assert not members.is_member(a) and "no member list signed by the swarm's owner" in members.refusal(a).message
    second = sign_member_list(MemberList(owner, 2, time.time(), (b,)), owner_key)
    assert members.offer(second) and not members.offer(first)  # an older version never comes back
    assert members.is_member(b) and not members.is_member(a)
    assert members.refusal(a).code == ErrorCode.NOT_MEMBER and f"swarm-members add {a}" in members.refusal(a).message
    assert not members.offer(forged) and not members.offer(future)
    validator = MemberListValidator(members)
    key = member_list_key(owner)
    assert validator.select(key, [first, second, forged]) == 1
    with pytest.raises(InvalidMemberList):
        validator.validate(key, mislabelled)
    third = sign_member_list(MemberList(owner, 3, time.time(), (a,)), owner_key)
    validator.validate(key, third)  # a node takes a newer list as soon as it is stored with it
    assert members.is_member(a) and not members.is_member(b)


def test_owner_ids_and_owner_key_files(tmp_path):
    result = invoke("swarm-owner-key", str(tmp_path / "owner.key"))
    owner = result.stdout.strip()
    assert result.exit_code == 0 and stat.S_IMODE((tmp_path / "owner.key").stat().st_mode) == 0o600
    assert parse_owner(owner) == owner == parse_owner(str(tmp_path / "owner.key.pub"))
    assert invoke("swarm-owner-key", str(tmp_path / "owner.key")).exit_code == 1  # never overwritten
    with pytest.raises(ValueError, match="is the owner's private key: give nodes the public part"):
        parse_owner(str(tmp_path / "owner.key"))
    with pytest.raises(ValueError, match="is not an owner ID"):
        parse_owner("12D3KooWnope")
    refused = invoke("serve", "--swarm-owner", "nope", "--new-swarm")
    assert refused.exit_code == 2 and "--swarm-owner" in refused.stderr and "is not an owner ID" in refused.stderr
    bad_peer = invoke("swarm-members", "add", "nope", "--owner-key", str(tmp_path / "owner.key"),
                      "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/" + owner)
    assert bad_peer.exit_code == 2 and "'nope' is not a peer ID" in bad_peer.stderr


def test_garbage_at_the_key_check_leaves_the_node_serving_members():
    """Peers that send a few bytes, random bytes or nothing and leave are refused; a member still
    gets through afterwards."""
    key = SwarmKey(os.urandom(32))

    async def main():
        async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as server:
            server.set_stream_handler(ECHO, _echo)
            host, port = parse_peer_address(full_addresses(server)[0]).addrs[0].value_for_protocol("ip4"), \
                int(parse_peer_address(full_addresses(server)[0]).addrs[0].value_for_protocol("tcp"))
            async def send_junk(junk: bytes) -> None:
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(junk)
                with trio.move_on_after(KEY_CHECK_TIMEOUT_S + 2):
                    try:
                        while await stream.receive_some(65536):  # the node's nonce and check, then its close
                            pass
                    except trio.BrokenResourceError:  # closed with our junk unread: a reset
                        pass
                await stream.aclose()

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:  # at once: a silent one waits out the check
                    for junk in (b"", b"abc", os.urandom(44), os.urandom(5000)):
                        nursery.start_soon(send_junk, junk)
                async with running_host(create_new_key_pair(), LOOPBACK, swarm_key=key) as member:
                    await member.connect(parse_peer_address(full_addresses(server)[0]))
                    await _round_trip(member, server.get_id())

    trio.run(main)
