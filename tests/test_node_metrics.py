"""Each node counts into a registry of its own: two nodes in one process never mix, and nothing
reaches prometheus_client's global registry (what a library embedding petald may scrape itself)."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from petald.p2pnode.transport.node_metrics import NodeMetrics


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_nodes_in_one_process_keep_their_own_counts():
    one, two = NodeMetrics(), NodeMetrics()
    one.tokens_generated.inc(7)
    one.count_wire(received=100, sent=40)
    one.step_seconds.observe(0.003)
    two.refusals.labels("too_large").inc()
    pages = [12]
    one.watch(one.kv_pages.labels("total"), lambda: pages[0])
    pages[0] = 16  # read at scrape time, not when watched
    first, second = samples(one), samples(two)
    assert first[("petald_tokens_generated_total", ())] == 7 and second[("petald_tokens_generated_total", ())] == 0
    assert first[("petald_wire_bytes_total", (("direction", "in"),))] == 100
    assert first[("petald_wire_bytes_total", (("direction", "out"),))] == 40
    assert first[("petald_server_step_seconds_bucket", (("le", "0.005"),))] == 1
    assert first[("petald_kv_pages", (("state", "total"),))] == 16
    assert second[("petald_server_refusals_total", (("reason", "too_large"),))] == 1
    assert ("petald_server_refusals_total", (("reason", "too_large"),)) not in first
    assert not any(family.name.startswith("petald") for family in REGISTRY.collect())
