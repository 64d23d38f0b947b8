"""The host as py-libp2p's DHT sees it: petald's own DHT protocol ID, and peers' protocol lists.

py-libp2p 0.8 hard-codes ``/ipfs/kad/1.0.0`` (``KadDHT(protocol_prefix=...)`` is ignored);
``KadProtocolAdapter`` hands the DHT a view of the host in which that ID reads as
``/petald/kad/1.0.0`` on the wire, so a petald swarm never mixes with IPFS, and in which only
peers that speak petald's DHT are listed (docs/swarm.md, "Library limits and workarounds").
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import common as kad_common
from libp2p.peer.id import ID

from petald.p2pnode.transport.libp2p_internals import LIBP2P_REQUIREMENT

PETALD_KAD_PROTOCOL = TProtocol("/petald/kad/1.0.0")
LIBRARY_KAD_PROTOCOL = TProtocol(kad_common.PROTOCOL_ID)
UNIDENTIFIED = "/petald/unidentified"  # what a peer speaks before identify has told us


def _speaks_dht(peerstore: Any, peer_id: ID) -> bool:
    try:
        return PETALD_KAD_PROTOCOL in (peerstore.get_protocols(peer_id) or [])
    except Exception:  # the library raises for a peer it has no entry for
        return False


class _PeerstoreView:
    """The host's peerstore, with peers' protocol lists read through the ID translation.

    ``peer_ids`` lists only peers known to serve the DHT: the library falls back to every
    known peer when its routing table is small, and a client node would stall its PUTs.
    """

    def __init__(self, peerstore: Any):
        self._peerstore = peerstore

    def peer_ids(self) -> list[ID]:
        return [p for p in self._peerstore.peer_ids() if _speaks_dht(self._peerstore, p)]

    def get_protocols(self, peer_id: ID) -> list[str]:
        try:
            protocols = self._peerstore.get_protocols(peer_id) or []
        except Exception:  # the library raises for a peer it has no entry for
            protocols = []
        if not protocols:
            return [UNIDENTIFIED]
        # Report petald's DHT as the library's ID, and an IPFS node's as absent.
        return [LIBRARY_KAD_PROTOCOL if p == PETALD_KAD_PROTOCOL else p
                for p in protocols if p != LIBRARY_KAD_PROTOCOL]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peerstore, name)


class KadProtocolAdapter:
    """The host as the DHT sees it: its one hard-coded protocol ID is ours on the wire."""

    def __init__(self, host: IHost):
        self._host = host
        self._peerstore = _PeerstoreView(host.get_peerstore())

    @staticmethod
    def _ours(protocol: TProtocol) -> TProtocol:
        return PETALD_KAD_PROTOCOL if protocol == LIBRARY_KAD_PROTOCOL else protocol

    def set_stream_handler(self, protocol: TProtocol, handler: Any) -> None:
        self._host.set_stream_handler(self._ours(protocol), handler)

    def remove_stream_handler(self, protocol: TProtocol) -> None:
        self._host.remove_stream_handler(self._ours(protocol))

    async def new_stream(self, peer_id: ID, protocols: list[TProtocol]) -> Any:
        return await self._host.new_stream(peer_id, [self._ours(p) for p in protocols])

    def get_peerstore(self) -> Any:
        return self._peerstore

    def get_connected_peers(self) -> list[ID]:
        # Same reason as _PeerstoreView.peer_ids: connected clients are not DHT servers.
        return [p for p in self._host.get_connected_peers() if _speaks_dht(self._host.get_peerstore(), p)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


# Library internals this room calls (dht, membership); checked at start so that another py-libp2p version
# fails with a sentence rather than mid-lookup. (The data path's internals, and the supported
# range, are in transport/libp2p_internals.)
_LIBRARY_INTERNALS = (("kad_dht.provider_store.ProviderStore", "_get_providers_from_peer_with_closers"),
                      ("kad_dht.value_store.ValueStore", "_get_from_peer"),
                      ("kad_dht.value_store.ValueStore", "_store_at_peer"),  # membership.publish
                      ("kad_dht.routing_table.RoutingTable", "find_local_closest_peers"))


def check_library() -> None:
    import importlib

    for path, attribute in _LIBRARY_INTERNALS:
        module_name, _, class_name = path.rpartition(".")
        cls = getattr(importlib.import_module(f"libp2p.{module_name}"), class_name, None)
        if cls is None or not hasattr(cls, attribute):
            raise RuntimeError(f"this py-libp2p has no {path}.{attribute}, which petald's DHT uses; "
                               f"install {LIBP2P_REQUIREMENT}")


