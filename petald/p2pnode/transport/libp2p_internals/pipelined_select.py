"""multistream-select in one round trip: the header and the protocol sent together.

py-libp2p's client sends ``/multistream/1.0.0``, waits for the peer's, then sends the protocol
and waits again: two round trips for every stream a node opens, and for each of the two
negotiations (Noise, then yamux) of every connection it dials. At 100 ms round trips that is
0.1 s per stream and 0.2 s per dial spent waiting on an answer known in advance. The spec lets
the initiator send both at once (go-libp2p's "lazy" client does); the listener reads them in
order as before, so any peer's listener takes it. Only a single protocol is sent this way:
offering several, one after another, needs each answer, and goes the library's way.

The answers are checked as the library checks them, and a refusal reads as the library's
(``MultiselectClientError`` naming the protocol), so callers cannot tell the two apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from libp2p.abc import IHost, IMultiselectCommunicator
from libp2p.custom_types import TProtocol
from libp2p.protocol_muxer import multiselect_client as library
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError

from petald.p2pnode.transport.libp2p_internals.library_check import LeanTransportError


class PipelinedMultiselectClient(library.MultiselectClient):
    async def select_one_of(self, protocols: Sequence[TProtocol], communicator: IMultiselectCommunicator,
                            negotiate_timeout: int = library.DEFAULT_NEGOTIATE_TIMEOUT) -> TProtocol:
        if len(protocols) != 1:
            return await super().select_one_of(protocols, communicator, negotiate_timeout)
        protocol = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                await communicator.write(library.MULTISELECT_PROTOCOL_ID)
                await communicator.write(str(protocol))
                header = await communicator.read()
                if not library.is_valid_handshake(header):
                    raise MultiselectClientError(f"multiselect protocol ID mismatch: expected "
                                                 f"{library.MULTISELECT_PROTOCOL_ID}, got {header!r}")
                answer = await communicator.read()
            except MultiselectCommunicatorError as error:
                raise MultiselectClientError(f"negotiation failed: {error}, protocol={protocol}") from error
            if answer == str(protocol):
                return protocol
            if answer == library.PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(
                    f"protocols not supported: tried {[protocol]}, timeout={negotiate_timeout}s. Last error: "
                    f"protocol not supported: {protocol}, response={answer!r}")
            raise MultiselectClientError(f"unrecognized response: {answer!r}, expected {str(protocol)!r} "
                                         f"or {library.PROTOCOL_NOT_FOUND_MSG!r}, protocol={protocol}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: "
                                     f"{[protocol]}")


def pipeline_negotiations(host: IHost) -> None:
    """Re-class the multiselect clients ``host`` negotiates with: its streams', and its dials'
    Noise and yamux (same layout: the subclass only overrides a method)."""
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    streams = getattr(host, "multiselect_client", None)
    if type(streams) is not library.MultiselectClient:
        raise LeanTransportError("py-libp2p's host has no multiselect_client (a MultiselectClient) to open its "
                                 "streams with in one round trip (p2pnode/transport/libp2p_internals)")
    for client in (streams, upgrader.security_multistream.multiselect_client,
                   upgrader.muxer_multistream.multiselect_client):
        if type(client) is library.MultiselectClient:
            client.__class__ = PipelinedMultiselectClient
