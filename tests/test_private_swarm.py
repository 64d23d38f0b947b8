"""Private swarms (``--swarm-key``): the key file, the XSalsa20 wrapper, real libp2p hosts with
and without the key (direct and through a relay), and real ``petald serve`` processes that a
client with the key uses and one without it (or with another) cannot reach."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import AsyncIterator

import nacl.secret
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.tools.anyio_service import background_trio_service

from petald.cli.local_swarm import LocalSwarm
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.transport.framed_stream import FramedStream
from petald.p2pnode.transport.host import full_addresses, parse_peer_address, running_host
from petald.p2pnode.transport.private_network import (
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
from tests.oracle import reference_greedy
from tests.petald_cli import PETALD, invoke

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


@pytest.mark.slow
def test_a_private_swarm_of_processes_serves_members_only(tiny_models, tmp_path):
    """Two ``petald serve`` processes with the key (the second joins through the first, over the
    DHT): a client with the key finds them and generates the oracle's tokens; one with another key
    is refused naming the key, and ``petald generate`` without a key ends with one line that says
    the swarm is private (run beside the others: a process start costs ~10 s on 2 cores)."""
    path = str(tiny_models["llama"])
    key_file = tmp_path / "swarm.key"
    key = write_new_swarm_key(key_file)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    with LocalSwarm(["0:3", "3:6"], model=path, extra_args=["--threads", "1", "--swarm-key", str(key_file)]) as swarm:
        keyless = subprocess.Popen([*PETALD, "generate", "hi", "--model", path, "--initial-peers", swarm.addresses[0],
                                    "--no-daemon"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with DistributedModel(model=path, initial_peers=swarm.addresses[:1], swarm_key=key, wire="float32") as model:
                assert model.generate(ids, max_new_tokens=8, eos_token_id=[])[0, 12:].tolist() \
                    == reference_greedy(path, ids, 8)
            with pytest.raises(ConnectionError, match="none of the initial peers answered: .* \\(the peer holds another swarm key"):
                DistributedModel(model=path, initial_peers=swarm.addresses[:1], swarm_key=SwarmKey(os.urandom(32)))
            out, err = keyless.communicate(timeout=120)
        finally:
            keyless.kill()
    assert keyless.returncode == 1 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("petald: error")]
    assert len(errors) == 1, err
    assert "likely in a private swarm, whose nodes need its key (--swarm-key FILE)" in errors[0]
