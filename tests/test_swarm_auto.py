"""A swarm that forms itself: real ``petald serve --blocks auto`` processes on 127.0.0.1, found via the DHT.

The phases run in order on one swarm (module fixture): four servers cover SmolLM2, a client
generates through the DHT alone, a fifth server places itself on the weakest blocks, one
server leaves and the others rebalance, and a second model joins without mixing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from libp2p.peer.id import ID

from petald.cli.local_swarm import LocalSwarm
from petald.kernels.sources.open_source import open_source
from petald.p2pnode.client.distributed_model import DistributedModel
from petald.p2pnode.client.node_thread import NodeThread
from petald.p2pnode.routing.placement import block_coverage
from petald.p2pnode.swarm.swarm_map import ModelMap, read_swarm
from petald.p2pnode.transport.host import parse_peer_address
from petald.p2pnode.transport.identity import load_or_create_identity
from tests.oracle import reference_greedy, reference_logits, reference_text

pytestmark = pytest.mark.slow

BLOCKS, PER_SERVER = 30, 8
AUTO_ARGS = ["--threads", "1", "--num-blocks", str(PER_SERVER), "--announce-period", "2",
             "--rebalance-period", "3", "--cache-tokens", "200000"]
PROMPT_IDS = torch.tensor([[504, 3575, 282, 4649, 314, 253, 1345, 30, 378, 3575]])


class SwarmWatcher:
    """A client node that reads the swarm map through the DHT, as any user would."""

    def __init__(self, initial_peer: str):
        self.node = NodeThread(load_or_create_identity(None), with_dht=True)
        self.node.call(self._join, initial_peer)

    async def _join(self, address: str) -> None:
        assert self.node.dht is not None
        await self.node.dht.join([address])

    def models(self) -> dict[str, ModelMap]:
        async def read() -> list[ModelMap]:
            assert self.node.dht is not None
            return await read_swarm(self.node.dht)
        return {m.model_id: m for m in self.node.call(read)}

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> dict[str, ModelMap]:
        deadline = time.monotonic() + timeout
        while True:
            models = self.models()
            if condition(models):
                return models
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; swarm: "
                                     + json.dumps({k: v.to_json()["servers"] for k, v in models.items()}))
            time.sleep(1.0)


def smollm(models: dict[str, ModelMap]) -> ModelMap | None:
    return next((m for k, m in models.items() if k.startswith("smollm2")), None)


def fully_covered(models: dict[str, ModelMap], servers: int) -> bool:
    m = smollm(models)
    return m is not None and not m.uncovered and sum(s.state == "online" for s in m.servers) == servers


@pytest.fixture(scope="module")
def auto_swarm():
    with LocalSwarm(["auto"] * 4, extra_args=AUTO_ARGS) as swarm:
        watcher = SwarmWatcher(swarm.addresses[0])
        try:
            yield swarm, watcher
        finally:
            watcher.node.stop()


def test_four_auto_servers_cover_every_block(auto_swarm):
    swarm, watcher = auto_swarm
    models = watcher.wait_for(lambda m: fully_covered(m, 4), "4 servers to cover all 30 blocks")
    spans = sorted((s.start, s.end) for s in smollm(models).servers)
    assert all(end - start == PER_SERVER for start, end in spans)


def test_generation_through_the_dht_alone_matches_the_oracle(auto_swarm):
    swarm, watcher = auto_swarm
    watcher.wait_for(lambda m: fully_covered(m, 4), "full coverage")
    with DistributedModel(initial_peers=[swarm.addresses[0]], wire="float32") as model:
        assert {s.peer_id for s in model.servers} <= {a.rsplit("/p2p/", 1)[1] for a in swarm.addresses}
        assert all(s.rtt > 0 and s.inference_rps > 0 for s in model.servers)
        out = model.generate(PROMPT_IDS, max_new_tokens=16, eos_token_id=[])
    assert out[0, PROMPT_IDS.shape[1]:].tolist() == reference_greedy(None, PROMPT_IDS, 16)
    # The CLI needs nothing but one address of the swarm.
    prompt = "The capital of France is"
    result = subprocess.run([sys.executable, "-m", "petald.cli.main", "generate", prompt,
                             "--initial-peers", swarm.addresses[1], "--max-new-tokens", "4", "--wire", "float32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ids = open_source(None).load_tokenizer()(prompt, return_tensors="pt").input_ids
    assert result.stdout.strip() == reference_text(None, ids, 4).strip()


def test_a_fifth_server_places_itself_on_the_weakest_blocks(auto_swarm):
    swarm, watcher = auto_swarm
    before = smollm(watcher.wait_for(lambda m: fully_covered(m, 4), "full coverage"))
    coverage = block_coverage(before.servers, BLOCKS)
    fifth = swarm.add("auto", AUTO_ARGS)
    start, end = fifth.span
    windows = [sorted(coverage[s:s + PER_SERVER]) for s in range(BLOCKS - PER_SERVER + 1)]
    assert sorted(coverage[start:end]) == min(windows), (coverage, fifth.span)
    watcher.wait_for(lambda m: fully_covered(m, 5), "the fifth server online")


def test_a_server_leaves_and_the_others_cover_its_blocks(auto_swarm):
    swarm, watcher = auto_swarm
    models = watcher.wait_for(lambda m: fully_covered(m, 5), "5 servers online")
    m = smollm(models)
    # Pick a server that alone holds some block, so that its leaving uncovers something.
    sole = {s.peer_id for b in range(BLOCKS) if len(m.servers_of(b)) == 1 for s in m.servers_of(b)}
    leaving = next(p for p in swarm.servers if p.process.poll() is None and p.address.endswith(tuple(sole)))
    assert leaving.stop(signal.SIGTERM) == 0
    assert any("announcing offline" in line for line in leaving.output)
    gone = leaving.address.rsplit("/p2p/", 1)[1]
    watcher.wait_for(lambda ms: all(s.state == "offline" for s in smollm(ms).servers if s.peer_id == gone),
                     "the leaving server's offline record", timeout=20)
    after = smollm(watcher.wait_for(lambda ms: fully_covered(ms, 4), "the others to cover every block again"))
    assert not after.uncovered
    assert any(line.startswith("petald: rebalancing") for p in swarm.servers for line in p.output)


def test_two_models_share_the_swarm_without_mixing(auto_swarm, tiny_models):
    swarm, watcher = auto_swarm
    tiny = swarm.add("0:6", ["--model", str(tiny_models["llama"]), "--threads", "1", "--announce-period", "2",
                             "--quant", "int8"])
    models = watcher.wait_for(lambda ms: len(ms) == 2 and fully_covered(ms, 4), "a second model in the swarm")
    other = next(m for k, m in models.items() if not k.startswith("smollm2"))
    assert [(s.start, s.end) for s in other.servers] == [(0, 6)] and not other.uncovered
    assert other.servers[0].quant == "int8" and other.servers[0].inference_rps > 0  # measured int8 blocks
    assert tiny.address.rsplit("/p2p/", 1)[1] not in {s.peer_id for s in smollm(models).servers}
    with DistributedModel(model=str(tiny_models["llama"]), initial_peers=[swarm.addresses[0]],
                          wire="float32") as model:
        assert [(s.info.model_id, s.info.quant) for s in model.servers] == [(other.model_id, "int8")]
        ids = torch.tensor([[5, 17, 42, 99]])
        logits = model.forward(ids)
    # int8 weights: close to the float32 oracle, not equal (tests/test_quant.py bounds the agreement).
    torch.testing.assert_close(logits, reference_logits(str(tiny_models["llama"]), ids), atol=0.2, rtol=0.1)
    result = subprocess.run([sys.executable, "-m", "petald.cli.main", "swarm", "--json",
                             "--initial-peers", swarm.addresses[0]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {m["model_id"]: m for m in json.loads(result.stdout)["models"]}
    assert set(listed) == set(models) and listed[other.model_id]["uncovered_blocks"] == []


def test_forged_and_expired_records_are_dropped_by_real_servers(auto_swarm):
    """An attacker node joins the running swarm and pushes, past its own validator, a record that
    claims a real server's peer ID, and a genuinely signed but expired record of its own."""
    import trio

    from petald.p2pnode.swarm.dht import SwarmDHT, record_key, sign_announcement
    from petald.p2pnode.transport.host import running_host
    from petald.protocol.announcement import ServerAnnouncement

    swarm, watcher = auto_swarm
    victim = smollm(watcher.wait_for(lambda ms: fully_covered(ms, 4), "full coverage")).servers[0]
    key_pair = load_or_create_identity(None)

    async def attack() -> None:
        async with running_host(key_pair) as host:
            attacker = SwarmDHT(host, key_pair, server_mode=True)
            async with attacker.running():
                await attacker.join([swarm.addresses[0]])
                now = time.time()
                forged = ServerAnnouncement(**{**victim.__dict__, "start": 0, "end": 1, "issued_at": now + 5,
                                               "expires_at": now + 600})
                stale = ServerAnnouncement(**{**victim.__dict__, "peer_id": attacker.peer_id, "issued_at": now - 600,
                                              "expires_at": now - 300})
                pushes = [(record_key(victim.peer_id), sign_announcement(forged, key_pair).to_bytes()),
                          (record_key(attacker.peer_id), sign_announcement(stale, key_pair).to_bytes())]
                for server in swarm.servers:
                    if server.process.poll() is None:
                        peer = parse_peer_address(server.address)
                        await host.connect(peer)
                        for key, value in pushes:
                            await attacker.kad.value_store._store_at_peer(peer.peer_id, key.encode(), value)

    trio.run(attack)
    models = watcher.models()
    record = next(s for s in smollm(models).servers if s.peer_id == victim.peer_id)
    assert (record.start, record.end) == (victim.start, victim.end)
    attacker_id = ID.from_pubkey(key_pair.public_key).to_base58()
    assert all(s.peer_id != attacker_id for m in models.values() for s in m.servers)
    assert sum(p.process.poll() is None for p in swarm.servers) == len(swarm.servers) - 1  # only the one that left
