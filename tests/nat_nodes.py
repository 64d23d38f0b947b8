"""Two small programs the NAT tests run inside the internet in a box's namespaces.

``python -m tests.nat_nodes relay LISTEN``: a relay and dial-back helper, serving no blocks (a
real libp2p host running petald's ``RelayService`` with hop), so a test can kill the relay alone.
Prints ``relay at ADDRESS``, runs until killed.

``python -m tests.nat_nodes generate MODEL PEER IDS TOKENS PAUSE_FILE GO_FILE``: a client that
generates greedy tokens (float32 wire: exact) twice, printing the route of the first run and each
token of the second; after half the second run's tokens it creates PAUSE_FILE and waits for
GO_FILE (the test injects its fault in between). Prints ``result {json}`` at the end.
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


def generate(model_dir: str, peer: str, ids: str, tokens: str, pause_file: str, go_file: str) -> None:
    import torch

    from petald.p2pnode.client.distributed_model import DistributedModel

    input_ids = torch.tensor([json.loads(ids)])
    count = int(tokens)
    model = DistributedModel(model=model_dir, initial_peers=[peer], wire_dtype="float32")
    try:
        route = [(h.start, h.end, h.server.address) for h in model.route().hops]
        first = model.generate(input_ids, max_new_tokens=count, eos_token_id=[])[0, input_ids.shape[1]:].tolist()
        seen: list[int] = []

        def streamer(token: torch.Tensor) -> None:
            seen.append(int(token[0]))
            if len(seen) == count // 2:
                open(pause_file, "w").close()
                deadline = time.monotonic() + 120
                while not os.path.exists(go_file) and time.monotonic() < deadline:
                    time.sleep(0.1)

        second = model.generate(input_ids, max_new_tokens=count, eos_token_id=[],
                                streamer=streamer)[0, input_ids.shape[1]:].tolist()
        recoveries = [(r.start, r.end, r.reason) for r in model.recoveries]
        print("result " + json.dumps({"route": route, "first": first, "second": second,
                                      "recoveries": recoveries}), flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    {"relay": relay, "generate": generate}[sys.argv[1]](*sys.argv[2:])
