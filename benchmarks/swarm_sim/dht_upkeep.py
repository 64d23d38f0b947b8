"""What keeping the swarm's DHT state costs each server per minute, from real message sizes.

Sizes are those of py-libp2p's own Kademlia protobufs carrying petald's own signed record and a
real signed peer record (py-libp2p attaches one as ``senderRecord`` to every request and answer,
and one per peer it lists when it holds it). Rates are petald's: a record every announce period
(a lookup, then a PUT to the k closest), provider records for the model key, each block key and
the swarm-wide key every ``REPROVIDE_EVERY`` periods (a lookup and k ADD_PROVIDERs each), and
for a ``--blocks auto`` server one read of the swarm every rebalance period, as
``ServerNode._swarm_records`` does it (``ReadPlan``). Lookups cost the FIND_NODE queries measured
by dht_model. Each request and answer also pays a stream's negotiation and framing
(``STREAM_OVERHEAD_B``).
"""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.envelope import seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import peer_record_from_peer_info
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from petald.p2pnode.swarm.dht import block_key, record_key, sign_announcement
from petald.p2pnode.swarm.presence import REPROVIDE_EVERY
from petald.protocol.announcement import ServerAnnouncement

STREAM_OVERHEAD_B = 120  # multistream-select both ways, yamux window/headers, Noise tags, varint


@dataclass(frozen=True)
class ReadPlan:
    """How a --blocks auto server reads the swarm: which provider keys, then one record per provider."""

    keys: int  # provider keys looked up per read
    providers_per_key: float  # providers each answer lists
    records: float  # records fetched (one GET_VALUE each)


@dataclass(frozen=True)
class Upkeep:
    exchanges_per_min: float  # requests sent (each answered)
    bytes_per_min: float  # requests and answers
    publish_bytes: float
    provide_bytes: float
    read_bytes: float
    record_requests_answered_per_min: float  # GET_VALUEs for its own record that a server answers
    records_stored_mean: float  # values and provider entries a node holds
    records_stored_max: float  # the nodes closest to the swarm-wide and model keys
    record_bytes: int
    largest_answer_bytes: int  # GET_PROVIDERS of the swarm-wide key: every server listed


class MessageSizes:
    def __init__(self) -> None:
        key_pair = create_new_key_pair()
        self.peer = ID.from_pubkey(key_pair.public_key)
        address = Multiaddr("/ip4/203.0.113.7/tcp/31337")
        self.address = address.to_bytes()
        self.envelope = seal_record(peer_record_from_peer_info(PeerInfo(self.peer, [address])),
                                    key_pair.private_key).marshal_envelope()
        full = f"/ip4/203.0.113.7/tcp/31337/p2p/{self.peer.to_base58()}"
        record = ServerAnnouncement(
            peer_id=self.peer.to_base58(), addresses=[full, full.replace("203.0.113.7", "198.51.100.9")],
            state="online", model_id="meta-llama/Llama-2-70b-chat-hf", fingerprint="f" * 16, num_blocks=80,
            start=20, end=31, dtype="float16", quant="none", max_length=8192, free_cache_tokens=1 << 20,
            inference_rps=312.5, forward_tps=4100.0, network_mbps=100.0, issued_at=1.8e9, expires_at=1.8e9 + 120,
            version="0.1.0")
        self.value = sign_announcement(record, key_pair).to_bytes()
        self.key = block_key(record.model_id, 0)

    def _peer(self, signed: bool = True) -> Message.Peer:
        return Message.Peer(id=self.peer.to_bytes(), addrs=[self.address],
                            signedRecord=self.envelope if signed else b"")

    def size(self, message: Message) -> int:
        return len(message.SerializeToString()) + STREAM_OVERHEAD_B

    def find_node(self) -> int:
        request = Message(type=Message.FIND_NODE, key=self.key, senderRecord=self.envelope)
        answer = Message(type=Message.FIND_NODE, closerPeers=[self._peer()] * BUCKET_SIZE, senderRecord=self.envelope)
        return self.size(request) + self.size(answer)

    def put_value(self) -> int:
        key = record_key(self.peer.to_base58()).encode()
        message = Message(type=Message.PUT_VALUE, key=key, record=Record(key=key, value=self.value),
                          senderRecord=self.envelope)
        return 2 * self.size(message)  # the answer echoes the record

    def add_provider(self) -> int:
        request = Message(type=Message.ADD_PROVIDER, key=self.key, providerPeers=[self._peer(False)],
                          senderRecord=self.envelope)
        return self.size(request) + self.size(Message(type=Message.ADD_PROVIDER, key=self.key))

    def get_providers(self, providers: int) -> int:
        request = Message(type=Message.GET_PROVIDERS, key=self.key, senderRecord=self.envelope)
        one = self.size(Message(providerPeers=[self._peer()])) - STREAM_OVERHEAD_B
        answer = Message(type=Message.GET_PROVIDERS, key=self.key, closerPeers=[self._peer()] * BUCKET_SIZE,
                         senderRecord=self.envelope)
        return self.size(request) + self.size(answer) + int(providers * one)

    def get_value(self) -> int:
        key = record_key(self.peer.to_base58()).encode()
        request = Message(type=Message.GET_VALUE, key=key, senderRecord=self.envelope)
        answer = Message(type=Message.GET_VALUE, key=key, record=Record(key=key, value=self.value),
                         senderRecord=self.envelope)
        return self.size(request) + self.size(answer)


def upkeep(servers: int, mean_blocks: float, num_blocks: int, lookup_queries: float, read: ReadPlan,
           announce_period: float, rebalance_period: float, sizes: MessageSizes | None = None) -> Upkeep:
    sizes = sizes or MessageSizes()
    k = BUCKET_SIZE
    lookup_exchanges, lookup_bytes = lookup_queries, lookup_queries * sizes.find_node()
    publishes = 60.0 / announce_period
    publish_x = publishes * (lookup_exchanges + k)
    publish_b = publishes * (lookup_bytes + k * sizes.put_value())
    keys = (2 + mean_blocks) * publishes / REPROVIDE_EVERY  # model key, block keys, swarm-wide key
    provide_x = keys * (lookup_exchanges + k)
    provide_b = keys * (lookup_bytes + k * sizes.add_provider())
    reads = 60.0 / rebalance_period
    # providers_of asks the k closest it knows and those a lookup finds: ~k GET_PROVIDERS beyond the lookup.
    read_x = reads * (read.keys * (lookup_exchanges + k) + read.records)
    read_b = reads * (read.keys * (lookup_bytes + k * sizes.get_providers(read.providers_per_key))
                      + read.records * sizes.get_value())
    stored_mean = k + k * (2 + mean_blocks)  # each value and provider entry is held by k nodes
    stored_max = stored_mean + servers  # the k nodes closest to the swarm-wide key hold every server's entry
    return Upkeep(publish_x + provide_x + read_x, publish_b + provide_b + read_b, publish_b, provide_b, read_b,
                  reads * read.records, stored_mean, stored_max, len(sizes.value),
                  sizes.get_providers(servers))
