"""``petald swarm`` as a table a person reads at a glance: one row per server, then the blocks
grouped into runs of equal coverage (not one line per block), uncovered runs marked.

It formats the JSON form of the map (``ModelMap.to_json``, also what ``GET /v1/swarm``
returns), so the map read by this process and the one a daemon sends print the same.
"""

from __future__ import annotations

from typing import Any


def _runs(blocks: list[dict[str, Any]]) -> list[tuple[int, int, int, float]]:
    """(start, end, servers, steps/s) for each run of consecutive blocks with the same servers."""
    runs: list[tuple[int, int, int, float]] = []
    previous: tuple[Any, ...] | None = None
    for block in blocks:
        key = tuple(block["servers"])
        if runs and key == previous:
            start, _, count, rps = runs[-1]
            runs[-1] = (start, block["block"] + 1, count, min(rps, block["inference_rps"]))
        else:
            runs.append((block["block"], block["block"] + 1, len(key), block["inference_rps"]))
        previous = key
    return runs


def format_swarm_table(models: list[dict[str, Any]]) -> str:
    if not models:
        return "no servers found in the swarm"
    lines: list[str] = []
    for m in models:
        online = sum(1 for s in m["servers"] if s["state"] == "online")
        lines.append(f"{m['model_id']}  ({m['num_blocks']} blocks, {online} of {len(m['servers'])} servers online)")
        lines.append("")
        header = (f"  {'SERVER':<16} {'BLOCKS':<9} {'STATE':<8} {'STEPS/S':>8} {'TOKENS/S':>9} "
                  f"{'FREE CACHE':>10}  {'DTYPE':<14} ADDRESS")
        lines.append(header)
        for s in m["servers"]:
            address = s["addresses"][0] if s["addresses"] else "-"
            span = f"{s['start']}:{s['end']}"
            lines.append(f"  ..{s['peer_id'][-14:]:<14} {span:<9} {s['state']:<8} "
                         f"{s['inference_rps']:>8.0f} {s['forward_tps']:>9.0f} {s['free_cache_tokens']:>10}  "
                         f"{s['dtype'] + '/' + s['quant']:<14} {address}")
        adapters = sorted({a for s in m["servers"] for a in s.get("adapters", [])})
        for name in adapters:
            holders = [f"{s['start']}:{s['end']}" for s in m["servers"] if name in s.get("adapters", [])]
            lines.append(f"  adapter {name}: on {', '.join(holders)}")
        lines.append("")
        lines.append(f"  {'BLOCKS':<9} {'SERVERS':>7} {'STEPS/S':>8}")
        for start, end, count, rps in _runs(m["blocks"]):
            mark = "  <- UNCOVERED: no server holds these blocks" if count == 0 else ""
            run = f"{start}:{end}"
            lines.append(f"  {run:<9} {count:>7} {rps:>8.0f}{mark}")
        uncovered = m["uncovered_blocks"]
        lines.append("")
        lines.append(f"  {len(uncovered)} blocks uncovered: generation cannot run until servers take them"
                     if uncovered else "  every block is served")
        lines.append("")
    return "\n".join(lines).rstrip()
