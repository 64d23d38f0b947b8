"""Two small programs the NAT tests run inside the internet in a box's namespaces.

``python -m tests.nat_nodes relay LISTEN``: a relay and dial-back helper, serving no blocks (a
real libp2p host running petald's ``RelayService`` with hop), so a test can kill the relay alone.
Prints ``relay at ADDRESS``, runs until killed.

``python -m tests.nat_nodes generate MODEL PEER IDS TOKENS MODE PAUSE_FILE GO_FILE``: a client that
generates greedy tokens (float32 wire: exact) twice and prints ``result {json}`` (the route of the
first run, both runs' tokens, its recoveries, its connections to the relayed server). MODE
``fault``: no direct upgrade; after half the second run's tokens it creates PAUSE_FILE and waits
for GO_FILE (the test injects its fault in between). MODE ``upgrade``: between the runs it waits
(up to 60 s) for a direct connection to the relayed server.
"""

from __future__ import annotations

import json
import os
import sys
import time


def relay(listen: str) -> None:
    import trio
    from libp2p.tools.anyio_service import background_trio_service

    from petald.p2pnode.transport.dialback import DialBackHelper
    from petald.p2pnode.transport.host import full_addresses, quiet_libp2p_logs, running_host
    from petald.p2pnode.transport.identity import load_or_create_identity
    from petald.p2pnode.transport.relay_service import RelayService

    async def main() -> None:
        async with running_host(load_or_create_identity(None), [listen]) as host:
            DialBackHelper(host).register()
            async with background_trio_service(RelayService(host, offer_hop=True)):
                print(f"relay at {full_addresses(host)[0]}", flush=True)
                await trio.sleep_forever()

    quiet_libp2p_logs()
    trio.run(main)


def _connections(model, peer_id: str) -> list[str]:
    from libp2p.peer.id import ID

    async def look() -> list[str]:
        conns = model.node.host.get_network().get_connections(ID.from_base58(peer_id))
        return [str(a) for c in conns for a in c.get_transport_addresses()]
    return model.node.call(look)


def generate(model_dir: str, peer: str, ids: str, tokens: str, mode: str, pause_file: str, go_file: str) -> None:
    import torch

    from petald.p2pnode.client.distributed_model import DistributedModel

    input_ids = torch.tensor([json.loads(ids)])
    count = int(tokens)
    model = DistributedModel(model=model_dir, initial_peers=[peer], wire="float32",
                             direct_upgrade=mode == "upgrade")
    try:
        route = [(h.start, h.end, h.server.address) for h in model.route().hops]
        relayed = [address.rsplit("/", 1)[1] for _, _, address in route if "/p2p-circuit/" in address]
        first = model.generate(input_ids, max_new_tokens=count, eos_token_id=[])[0, input_ids.shape[1]:].tolist()
        before = _connections(model, relayed[0]) if relayed else []
        deadline = time.monotonic() + 60
        while mode == "upgrade" and relayed and time.monotonic() < deadline and \
                all("/p2p-circuit" in a for a in _connections(model, relayed[0])):
            time.sleep(0.5)
        seen: list[int] = []

        def streamer(token: torch.Tensor) -> None:
            seen.append(int(token[0]))
            if mode == "fault" and len(seen) == count // 2:
                open(pause_file, "w").close()
                deadline = time.monotonic() + 120
                while not os.path.exists(go_file) and time.monotonic() < deadline:
                    time.sleep(0.1)

        second = model.generate(input_ids, max_new_tokens=count, eos_token_id=[],
                                streamer=streamer)[0, input_ids.shape[1]:].tolist()
        recoveries = [(r.start, r.end, r.reason) for r in model.recoveries]
        after = _connections(model, relayed[0]) if relayed else []
        print("result " + json.dumps({"route": route, "first": first, "second": second, "recoveries": recoveries,
                                      "connections_before": before, "connections_after": after}), flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    {"relay": relay, "generate": generate}[sys.argv[1]](*sys.argv[2:])
