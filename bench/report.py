"""Writes docs/benchmarks.md and docs/benchmarks.png from the JSON results of bench.turn_cost and
bench.end_to_end (run them first; `make bench` runs all three)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.contenders import DESCRIPTIONS, ENGRAM

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
    out = [
        "## 1. Per-turn memory cost",
        "",
        "Load the window for a turn + commit the turn, no model time; "
        "3,000-token window, ≈60-token messages. Median and p99 in milliseconds; × = median divided by "
        f"`{REFERENCE}`'s at the same size. All sizes and contenders interleaved turn by turn in one run.",
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
                cells.append(f"{fmt_ms(row['median_ms'])} / {fmt_ms(row['p99_ms'])} ({x:,.1f}×)" if x else "–")
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


def targets_section(rows: list[dict[str, Any]], e2e: dict[str, Any] | None) -> list[str]:
    table = by_key(rows)
    sizes = sorted({r["size"] for r in rows})
    lines = ["## Targets", "", "| target | where we stand | met |", "|---|---|---|"]
    if sizes:
        small, large = sizes[0], sizes[-1]
        for name in ENGRAM:
            a, b = table.get((small, name)), table.get((large, name))
            if a and b and a.get("median_ms") and b.get("median_ms"):
                growth = b["median_ms"] / a["median_ms"]
                lines.append(
                    f"| `{name}` at {large:,} ≤ 1.5× its cost at {small:,} | {growth:.2f}× | "
                    f"{'yes' if growth <= 1.5 else 'no'} |"
                )
    for name, goal in (("cmb+redis", 500), ("json-get-set", 20)):
        x = ratio(table, 1000, name)
        if x is not None:
            lines.append(
                f"| ≥ {goal}× faster than `{name}` at 1,000 messages | {x:,.0f}× | {'yes' if x >= goal else 'no'} |"
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
            f"| end to end ≥ 0.8× the stateless baseline's throughput | {x:.2f}× | {'yes' if x >= 0.8 else 'no'} |"
        )
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


def end_to_end_section(e2e: dict[str, Any]) -> list[str]:
    out = [
        "## 3. End to end",
        "",
        e2e.get("setup", ""),
        "",
        "| stack | turns/s | p50 ms | p99 ms | errors | hit / delta / miss |",
        "|---|---|---|---|---|---|",
    ]
    for run in e2e.get("runs", []):
        split = run.get("outcomes") or {}
        out.append(
            f"| {run['name']} | {run['turns_per_s']:.1f} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} | "
            f"{run['errors']} | {split.get('hit', 0)} / {split.get('delta', 0)} / {split.get('miss', 0)} |"
        )
    footprint = e2e.get("footprint")
    if footprint:
        out += [
            "",
            "## 4. Footprint",
            "",
            f"- RSS per worker after warm-up: {footprint['rss_mib']:.0f} MiB",
            f"- process start to `/readyz` OK: {footprint['ready_s']:.2f} s",
        ]
    return [*out, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turn-cost", type=Path, default=RESULTS / "turn_cost.json")
    parser.add_argument("--end-to-end", type=Path, default=RESULTS / "end_to_end.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows = json.loads(args.turn_cost.read_text())
    e2e = json.loads(args.end_to_end.read_text()) if args.end_to_end.exists() else None
    png = args.out.with_suffix(".png")
    plot(rows, png)
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {environment()}. Numbers from a 2-core VM; compare ratios, not absolute times.",
        "",
    ]
    lines += targets_section(rows, e2e)
    lines += turn_cost_section(rows)
    lines += [f"![per-turn cost vs history length]({png.name})", ""]
    if e2e:
        lines += end_to_end_section(e2e)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
