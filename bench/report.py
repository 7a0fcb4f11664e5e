"""Writes docs/benchmarks.md and docs/benchmarks.png from the JSON results of bench.turn_cost and
bench.end_to_end, and of bench.burst, bench.summary and bench.topologies when present (`make bench` runs them all)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.contenders import DESCRIPTIONS, ENGRAM, TOKEN_LIMIT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REFERENCE = "engram-delta"  # the common case behind a non-sticky load balancer


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["size"], r["contender"]): r for r in rows}


def ratio(
    rows: dict[tuple[int, str], dict[str, Any]], size: int, name: str, reference: str = REFERENCE
) -> float | None:
    mine, ref = rows.get((size, name)), rows.get((size, reference))
    if not mine or not ref or mine.get("median_ms") is None or not ref.get("median_ms"):
        return None
    return float(mine["median_ms"]) / float(ref["median_ms"])


def environment() -> str:
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return (
        f"{platform.node() and 'this machine'}: {platform.machine()}, {subprocess.getoutput('nproc')} cores, "
        f"Python {platform.python_version()}, Redis {redis_version.removeprefix('v=')}, "
        f"llama-index-core {metadata.version('llama-index-core')}, "
        f"llama-index-storage-chat-store-redis {metadata.version('llama-index-storage-chat-store-redis')}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def turn_cost_section(rows: list[dict[str, Any]]) -> list[str]:
    table = by_key(rows)
    sizes = sorted({r["size"] for r in rows})
    names = [n for n in DESCRIPTIONS if any(r["contender"] == n for r in rows)]
    most = max((r.get("turns") or 0 for r in rows), default=0)
    out = [
        "## 1. Per-turn memory cost",
        "",
        "Load the window for a turn + commit the turn, no model time; "
        "3,000-token window, ≈60-token messages. Median and p99 in milliseconds; × = median divided by "
        f"`{REFERENCE}`'s at the same size. All sizes and contenders interleaved turn by turn in one run; "
        f"{most} turns each unless a cell says fewer (the contender spent its time budget at that size).",
        "",
    ]
    out += [
        "| contender | " + " | ".join(f"{s:,} msgs: median / p99 (×)" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in names:
        cells = []
        for size in sizes:
            row = table.get((size, name))
            if row is None:
                cells.append("not run")
            elif row.get("stopped"):
                cells.append(f"stopped: {row['stopped']}")
            else:
                x = ratio(table, size, name)
                cell = f"{fmt_ms(row['median_ms'])} / {fmt_ms(row['p99_ms'])} ({x:,.1f}×)" if x else "–"
                if row.get("turns", most) < most:  # it spent its time budget first
                    cell += f", {row['turns']} turns"
                cells.append(cell)
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    out += ["", *[f"- `{n}`: {DESCRIPTIONS[n]}" for n in names], ""]
    out += [
        "## 2. Redis work per turn",
        "",
        "Round trips = commands the client sent (MONITOR, commands run "
        "inside Engram's functions not counted: they cost no round trip); bytes from INFO stats.",
        "",
        "| contender | size | round trips | bytes to Redis | bytes from Redis |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        for size in sizes:
            row = table.get((size, name))
            if row and row.get("round_trips") is not None:
                out.append(
                    f"| `{name}` | {size:,} | {row['round_trips']:.1f} | {row['bytes_to_redis']:,.0f} | "
                    f"{row['bytes_from_redis']:,.0f} |"
                )
    return [*out, ""]


def first_full_window(rows: list[dict[str, Any]]) -> int | None:
    """The smallest size whose window is full: the 3,000-token budget holds fewer messages than the
    session (measured by turn_cost as `window_messages`; else computed from the messages' tokens)."""
    sizes = sorted({r["size"] for r in rows})
    measured = {r["size"]: r["window_messages"] for r in rows if r.get("window_messages")}
    if not measured:
        from bench.contenders import message_text
        from engram.tokens import default_tokenizer

        capacity = TOKEN_LIMIT // default_tokenizer()(message_text(0))
        measured = {size: min(size, capacity) for size in sizes}
    return next((size for size in sizes if measured.get(size, size) < size), None)


def window_note(rows: list[dict[str, Any]]) -> str:
    windows = sorted({(r["size"], r["window_messages"]) for r in rows if r.get("window_messages")})
    if not windows:
        return ""
    shown = ", ".join(f"{w:,} at {s:,}" for s, w in windows)
    return f"Messages one load hands the model (the window): {shown}."


def flatness_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Engram's cost at the largest size against the smallest (the issue's literal target) and against
    the first size whose window is full (where what a load reads stops growing)."""
    table = by_key(rows)
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) < 2:
        return []
    small, large, full = sizes[0], sizes[-1], first_full_window(rows)
    lines = []
    for name in ENGRAM:
        big = table.get((large, name))
        for base, label in ((small, ""), (full, " (the first size whose window is full)")):
            ref = table.get((base, name)) if base is not None and base < large else None
            if ref is None or base is None or not big or not ref.get("median_ms") or not big.get("median_ms"):
                continue
            growth = big["median_ms"] / ref["median_ms"]
            lines.append(
                f"| `{name}` at {large:,} ≤ 1.5× its cost at {base:,}{label} | {growth:.2f}× | "
                f"{'yes' if growth <= 1.5 else 'no'} |"
            )
    return lines


# Issue 15's targets for the service (the hot path, start-up and footprint of one replica).
E2E_RATIO_TARGET = 0.95
READY_TARGET_S = 2.0
RSS_TARGET_MIB = 150
QUOTA_OVERHEAD_TARGET = 0.10  # issue 14: quotas live inside the calls a turn makes anyway


def targets_section(
    rows: list[dict[str, Any]],
    e2e: dict[str, Any] | None,
    summary: dict[str, Any] | None = None,
    topologies: dict[str, Any] | None = None,
) -> list[str]:
    table = by_key(rows)
    lines = ["## Targets", "", "| target | where we stand | met |", "|---|---|---|", *flatness_rows(rows)]
    for name, goal in (("cmb+redis", 500), ("json-get-set", 20)):
        x = ratio(table, 1000, name)
        if x is not None:
            lines.append(
                f"| ≥ {goal}× faster than `{name}` at 1,000 messages | {x:,.0f}× | {'yes' if x >= goal else 'no'} |"
            )
        elif (row := table.get((1000, name))) and row.get("stopped"):
            lines.append(f"| ≥ {goal}× faster than `{name}` at 1,000 messages | it was stopped: {row['stopped']} | – |")
    quota_costs = [
        table[(size, "engram-quotas")]["median_ms"] / table[(size, "engram-hit")]["median_ms"]
        for size in sorted({r["size"] for r in rows})
        if (table.get((size, "engram-quotas")) or {}).get("median_ms")
        and (table.get((size, "engram-hit")) or {}).get("median_ms")
    ]
    if quota_costs:
        worst_quota = max(quota_costs)
        lines.append(
            f"| quota and rate checks add ≤ {QUOTA_OVERHEAD_TARGET:.0%} to a turn (`engram-quotas` / `engram-hit`, "
            f"worst size) | {worst_quota:.2f}× | {'yes' if worst_quota <= 1 + QUOTA_OVERHEAD_TARGET else 'no'} |"
        )
    trips = [table[k]["round_trips"] for k in table if k[1] in ENGRAM and table[k].get("round_trips") is not None]
    if trips:
        lines.append(
            f"| 2 Redis round trips per turn | {min(trips):.1f}–{max(trips):.1f} | "
            f"{'yes' if max(trips) <= 2 else 'no'} |"
        )
    if e2e and e2e.get("throughput_ratio") is not None:
        x = e2e["throughput_ratio"]
        lines.append(
            f"| end to end ≥ {E2E_RATIO_TARGET}× the stateless baseline's throughput | {x:.2f}× | "
            f"{'yes' if x >= E2E_RATIO_TARGET else 'no'} |"
        )
    footprint = (e2e or {}).get("footprint") or {}
    if footprint.get("ready_s") is not None:
        ready = footprint["ready_s"]
        lines.append(
            f"| a replica ready ≤ {READY_TARGET_S:.1f} s after start | {ready:.2f} s | "
            f"{'yes' if ready <= READY_TARGET_S else 'no'} |"
        )
    engram_rss = list(((footprint.get("rss_mib") or {}).get("engram") or {}).values())
    if engram_rss:
        worst = max(engram_rss)
        lines.append(
            f"| RSS per worker ≤ {RSS_TARGET_MIB} MiB | {worst:.0f} MiB (largest of {len(engram_rss)}) | "
            f"{'yes' if worst <= RSS_TARGET_MIB else 'no'} |"
        )
    lines += summary_target(summary)
    lines += topology_targets(topologies)
    sizes = sorted({r["size"] for r in rows})
    full = first_full_window(rows)
    if full is not None and full > sizes[0]:
        measured = ": the second row per contender measures that." if full < sizes[-1] else "."
        lines += [
            "",
            f"The literal flatness target compares against {sizes[0]:,} messages, where the whole session fits "
            f"the {TOKEN_LIMIT:,}-token window. A load reads the window, so its cost grows with the window until "
            f"the window is full (≈{TOKEN_LIMIT // 60} messages of ≈60 tokens: from {full:,} messages here) and "
            f"is flat after{measured} This shows most in `engram-cold`, which reads the whole window from Redis "
            "on every turn; `engram-hit` and `engram-delta` read only what changed but still hand the model "
            f"(and copy) the whole window. {window_note(rows)}",
        ]
    return [*lines, ""]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in DESCRIPTIONS:
        points = sorted((r["size"], r["median_ms"]) for r in rows if r["contender"] == name and r.get("median_ms"))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("messages in the session")
    ax.set_ylabel("median ms per turn (load + commit)")
    ax.set_title("Per-turn memory cost vs history length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _split(outcomes: dict[str, int]) -> str:
    if outcomes.get("off"):
        return f"memory off ({outcomes['off']})"
    total = sum(outcomes.get(k, 0) for k in ("hit", "delta", "miss")) or 1
    return " / ".join(
        f"{outcomes.get(k, 0)} ({100 * outcomes.get(k, 0) / total:.0f}%)" for k in ("hit", "delta", "miss")
    )


def end_to_end_section(e2e: dict[str, Any]) -> list[str]:
    runs = {run["name"]: run for run in e2e.get("runs", [])}
    baseline = runs.get("stateless", {}).get("turns_per_s")
    out = [
        "## 3. End to end",
        "",
        e2e.get("setup", ""),
        "",
        "| stack | turns/s | × stateless | p50 ms | p99 ms | errors | hit / delta / miss | workers | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs.values():
        x = f"{run['turns_per_s'] / baseline:.2f}×" if baseline else "–"
        if run["name"] == "stateless":
            recall = f"none of {run['follow_ups']} (by design)"
        else:
            recall = f"{run['follow_ups'] - run['recall_failures']} of {run['follow_ups']} follow-ups"
        out.append(
            f"| `{run['name']}` | {run['turns_per_s']:.1f} | {x} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} | "
            f"{run['errors']} | {_split(run.get('outcomes') or {})} | {len(run.get('replicas') or {})} | {recall} |"
        )
    out += ["", *[f"- `{run['name']}`: {run['description']}" for run in runs.values()]]
    rounds = "; ".join(
        f"`{run['name']}` " + ", ".join(f"{r['turns_per_second']:.0f}" for r in run.get("rounds", []))
        for run in runs.values()
    )
    out += ["", f"turns/s per round: {rounds}."]
    if e2e.get("round_ratios"):
        ratios = ", ".join(f"{x:.2f}" for x in e2e["round_ratios"])
        out.append(f"`engram` / `stateless` per round: {ratios}.")
    if baseline and "engram" in runs and "sticky" in runs:
        sticky, engram = runs["sticky"]["turns_per_s"], runs["engram"]["turns_per_s"]
        out += [
            "",
            f"What affinity would buy: the sticky stack served {sticky:.1f} turns/s "
            f"({sticky / baseline:.2f}× the baseline) against {engram:.1f} without affinity: "
            f"{sticky / engram - 1:+.0%}, "
            "from turning `delta` loads into `hit`s (both are one round trip; "
            "a delta also reads the other replicas' new messages).",
        ]
    if e2e.get("load_before"):
        before, after = e2e["load_before"], e2e.get("load_after") or e2e["load_before"]
        out.append(f"Load average (1 min) before / after the run: {before[0]:.2f} / {after[0]:.2f}.")
    for problem in e2e.get("problems") or []:
        out.append(f"**Problem in this run:** {problem}.")
    footprint = e2e.get("footprint")
    if footprint:
        out += ["", "## 4. Footprint", ""]
        for name, workers in (footprint.get("rss_mib") or {}).items():
            values = sorted(workers.values())
            if values:
                out.append(
                    f"- RSS per worker after warm-up, `{name}`: {statistics.mean(values):.0f} MiB "
                    f"({', '.join(f'{v:.0f}' for v in values)} MiB over {len(values)} workers; VmRSS)"
                )
        if footprint.get("ready_s") is not None:
            samples = ", ".join(f"{s:.2f}" for s in footprint.get("ready_samples_s", []))
            out.append(
                f"- process start to `/readyz` OK: {footprint['ready_s']:.2f} s (median of {samples} s; one "
                "`engram serve` at a time, while the stacks were idle)"
            )
    return [*out, ""]


def burst_section(burst: dict[str, Any]) -> list[str]:
    out = [
        "",
        "## 5. Bursts on one replica",
        "",
        burst["setup"] + ". A burst above the connection pool waits for a connection instead of failing.",
        "",
        "| round | concurrency | statuses | errors | p50 (ms) | p99 (ms) | one turn alone, p50 (ms) | p99 / alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in burst["bursts"]:
        statuses = ", ".join(f"{count}× {status}" for status, count in sorted(b["statuses"].items()))
        out.append(
            f"| {b['round']} | {b['concurrency']} | {statuses} | {b['errors']} | {fmt_ms(b['p50_ms'])} | "
            f"{fmt_ms(b['p99_ms'])} | {fmt_ms(b['alone_p50_ms'])} | {b['p99_over_alone']}× |"
        )
    return out


def summary_target(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    growth = summary["growth"]
    return [
        f"| summary mode: hot path at {growth['to']:,} ≤ 1.5× its cost at {growth['from']:,} | "
        f"{growth['ratio']:.2f}× | {'yes' if growth['ratio'] <= 1.5 else 'no'} |"
    ]


def summary_section(summary: dict[str, Any]) -> list[str]:
    """Summary mode: the hot path against history length, summarizing per message, ChatSummaryMemoryBuffer."""
    rows = summary["hot_path"]
    sizes = sorted({r["size"] for r in rows if r["contender"] == "engram-summary"})
    out = [
        "",
        "## 6. Summary mode (rolling summary)",
        "",
        f"`ENGRAM_MEMORY=summary`: a {summary['token_limit']:,}-token limit shared as {summary['summary_tokens']:,} "
        f"for the summary and {summary['window_tokens']:,} for the window, ≈60-token messages. `engram-summary`: "
        "two replicas alternating, a turn = one load (window + summary, one round trip) + one commit, timed; the "
        f"summary advanced after a turn whose load found {summary['batch']} messages out of the window "
        "(untimed: a background task in the service). `csmb+redis`: LlamaIndex's `ChatSummaryMemoryBuffer` over "
        "llama-index-storage-chat-store-redis with a deterministic local LLM (Engram's `EchoLLM`), so the memory "
        "class is measured, not a model; its first `get` rewrites the stored list as one summary message + the "
        "window (the rest of the history is gone), so it is re-seeded to its size after each timed turn "
        "(untimed) and fewer turns are run (a time budget per size). `csmb-steady`: its steady state once "
        "collapsed, summarizing again on every turn, on the caller's path. Median / p99 in ms.",
        "",
        "| contender | " + " | ".join(f"{s:,} msgs: median / p99 (turns)" for s in sizes) + " | round trips |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for name in ("engram-summary", "csmb+redis"):
        cells = []
        trips = []
        for size in sizes:
            row = next((r for r in rows if r["contender"] == name and r["size"] == size), None)
            if row is None or row.get("median_ms") is None:
                cells.append("not run")
                continue
            cells.append(f"{fmt_ms(row['median_ms'])} / {fmt_ms(row['p99_ms'])} ({row['turns']})")
            if row.get("round_trips") is not None:
                trips.append(f"{row['round_trips']:.0f}")
        out.append(f"| `{name}` | " + " | ".join(cells) + f" | {' / '.join(trips) or '–'} |")
    steady = next((r for r in rows if r["contender"] == "csmb-steady"), None)
    if steady and steady.get("median_ms") is not None:
        out += ["", f"`csmb-steady`: {fmt_ms(steady['median_ms'])} ms median over {steady['turns']} turns."]
    growth = summary["growth"]
    out += [
        "",
        f"Engram's hot path at {growth['to']:,} messages is {growth['ratio']:.2f}× its cost at {growth['from']:,}.",
        "",
        "Summarizing (Engram, echo extract as the summarizer; Redis: one read of the summary, one XRANGE of the "
        "batch, one compare-and-set per summarizer call):",
        "",
        "| size | kind | messages folded | summarizer calls | ms per message |",
        "|---|---|---|---|---|",
    ]
    for item in summary["summarizing"]:
        per = item.get("ms_per_message")
        out.append(
            f"| {item['size']:,} | {item['kind']} | {item['messages']:,} | {item['calls']:,} | "
            f"{'–' if per is None else f'{per:.3f}'} |"
        )
    return [*out, ""]


# Issue 11: Sentinel and Redis Cluster beside standalone.
TOPOLOGY_RATIO_TARGET = 1.3


def topology_rows(topologies: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["size"], r["contender"]): r for r in topologies["rows"]}


def topology_ratios(topologies: dict[str, Any], topology: str) -> dict[str, float]:
    """Per durability, the worst (over sizes) median of ``topology`` / standalone's median at the same size."""
    table = topology_rows(topologies)
    worst: dict[str, float] = {}
    for (size, name), row in table.items():
        mine, _, durability = name.partition("/")
        base = table.get((size, f"standalone/{durability}"))
        if mine != topology or not base or not base.get("median_ms") or row.get("median_ms") is None:
            continue
        worst[durability] = max(worst.get(durability, 0.0), row["median_ms"] / base["median_ms"])
    return worst


def topology_targets(topologies: dict[str, Any] | None) -> list[str]:
    if not topologies:
        return []
    lines = []
    for topology in ("sentinel", "cluster"):
        worst = topology_ratios(topologies, topology)
        if worst:
            shown = ", ".join(f"{x:.2f}× with `{d}` commits" for d, x in worst.items())
            met = max(worst.values()) <= TOPOLOGY_RATIO_TARGET
            lines.append(
                f"| {topology} per-turn cost ≤ {TOPOLOGY_RATIO_TARGET}× standalone's (same durability, worst size) "
                f"| {shown} | {'yes' if met else 'no'} |"
            )
    trips = [r["round_trips"] for r in topologies["rows"] if r.get("round_trips") is not None]
    if trips:
        measured = ", ".join(dict.fromkeys(r["topology"] for r in topologies["rows"]))
        lines.append(
            f"| round trips per turn 2.0 in every topology ({measured}; `local` and `replicated`) | "
            f"{min(trips):.1f}–{max(trips):.1f} | {'yes' if min(trips) == max(trips) == 2 else 'no'} |"
        )
    return lines


def topologies_section(topologies: dict[str, Any]) -> list[str]:
    table = topology_rows(topologies)
    sizes = sorted({r["size"] for r in topologies["rows"]})
    names = list(dict.fromkeys(r["contender"] for r in topologies["rows"]))
    out = [
        "",
        "## 7. Redis topologies",
        "",
        f"Engram's turn (load the window + commit the turn, one replica process's store, tail cache on: the "
        f"`engram-hit` case of section 1) in each topology and commit durability, interleaved turn by turn in "
        f"one run, {topologies['turns']:,} turns each per size. Setup: {topologies['setup']}. So what differs "
        "between `standalone` and `sentinel` is the client path (redis-py's Sentinel-managed pool), not the "
        "servers; `cluster` adds redis-py's cluster client (slot map, the node per key) and cluster-enabled "
        "servers, and its keys carry the tenant's hash tag. `replicated` (`ENGRAM_COMMIT_DURABILITY=replicated`) "
        "pipelines `WAIT 1` with the commit (in a cluster, on the node of the session's slot); `local` "
        "acknowledges once the primary ran it. Median / p99 in ms; × = median divided by `standalone/local`'s "
        "at the same size.",
        "",
        "| topology / durability | "
        + " | ".join(f"{s:,} msgs: median / p99 (×)" for s in sizes)
        + " | round trips per turn (to Sentinels) | commands to the session's primary per turn |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    for name in names:
        cells, trips, commands = [], "–", "–"
        for size in sizes:
            row = table.get((size, name))
            if row is None or row.get("median_ms") is None:
                cells.append("not run")
                continue
            cells.append(f"{fmt_ms(row['median_ms'])} / {fmt_ms(row['p99_ms'])} ({row['ratio']:.2f}×)")
            if row.get("round_trips") is not None:
                trips = f"{row['round_trips']:.1f} ({row['sentinel_round_trips']:.1f})"
                commands = f"{row['commands']:.1f}"
        out.append(f"| `{name}` | " + " | ".join(cells) + f" | {trips} | {commands} |")
    local = [r for r in topologies["rows"] if r["durability"] == "local" and r.get("median_ms")]
    costs = [
        table[(r["size"], f"{r['topology']}/replicated")]["median_ms"] / r["median_ms"]
        for r in local
        if (table.get((r["size"], f"{r['topology']}/replicated")) or {}).get("median_ms")
    ]
    out += [
        "",
        f"Round trips are counted at the client ({topologies['counted_turns']} turns each, after the timed ones): "
        "every send of one or more commands to any Redis process (primary, Sentinel or any cluster node) "
        "followed by reading their replies is one round trip; a pipeline is one. Commands are counted on the "
        "primary serving the session (in the cluster the primary of the session's slot; MONITOR, Engram's "
        "connections only, commands run inside Engram's functions not counted): with `replicated` the commit's "
        "`WAIT` is a third command, in the commit's round trip. The Sentinels are asked for the primary only "
        "when a connection opens, so a warm replica sends them nothing per turn; the cluster client reads the "
        "slot map at start (and after a redirect), so a warm replica sends each turn straight to the slot's "
        "node.",
    ]
    if costs:
        out += [
            "",
            f"`replicated` costs {min(costs):.2f}–{max(costs):.2f}× `local` in the same topology: the "
            "primary answers the commit's `WAIT` only once a replica acknowledged it.",
        ]
    if topologies.get("replicas"):
        shown = ", ".join(f"{n}: {c}" for n, c in topologies["replicas"].items())
        out += ["", f"Replicas connected to each primary at the end of the run: {shown}."]
    if topologies.get("load_before"):
        before, after = topologies["load_before"], topologies.get("load_after") or topologies["load_before"]
        out.append(f"Load average (1 min) before / after: {before[0]:.2f} / {after[0]:.2f}.")
    out += [
        "",
        "Everything runs on one 2-core machine over loopback: the replicas, Sentinels and cluster nodes share "
        "the cores with the primary and the client, and the replication latency `WAIT` pays is loopback's, not "
        "a network's (across hosts or zones `replicated` adds at least one primary-to-replica round trip per "
        "commit). One tenant's sessions live on one cluster primary, so this measures the cost of a turn, not "
        "how a Redis Cluster spreads many tenants' load over its primaries. Not measured here: the failover "
        "window and the turns a failover loses (tests/topologies measure those), the cost while connections "
        "are reopened or the slot map is refreshed (after a failover, a redirect during a reshard or a dropped "
        "connection), and AOF (off in every topology here; section 1 runs with AOF everysec).",
    ]
    return [*out, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turn-cost", type=Path, default=RESULTS / "turn_cost.json")
    parser.add_argument("--end-to-end", type=Path, default=RESULTS / "end_to_end.json")
    parser.add_argument("--burst", type=Path, default=RESULTS / "burst.json")
    parser.add_argument("--summary", type=Path, default=RESULTS / "summary.json")
    parser.add_argument("--topologies", type=Path, default=RESULTS / "topologies.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows = json.loads(args.turn_cost.read_text())
    e2e = json.loads(args.end_to_end.read_text()) if args.end_to_end.exists() else None
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {environment()}. Numbers from a 2-core VM; compare ratios, not absolute times.",
        "",
    ]
    summary = json.loads(args.summary.read_text()) if args.summary.exists() else None
    topologies = json.loads(args.topologies.read_text()) if args.topologies.exists() else None
    lines += targets_section(rows, e2e, summary, topologies)
    lines += turn_cost_section(rows)
    lines += [f"![per-turn cost vs history length]({png.name})", ""]
    if e2e:
        lines += end_to_end_section(e2e)
    if args.burst.exists():
        lines += burst_section(json.loads(args.burst.read_text()))
    if summary:
        lines += summary_section(summary)
    if topologies:
        lines += topologies_section(topologies)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
