"""`make bench`: the per-turn cost (bench.turn_cost), summary mode (bench.summary), end to end
(bench.end_to_end), bursts on one replica (bench.burst), Redis topologies (bench.topologies), then the report
(bench.report: docs/benchmarks.md and docs/benchmarks.png), each in its own process with its defaults.

    python -m bench                    # everything, full size (several minutes; run it on a quiet machine)
    python -m bench --skip end_to_end  # leave a part out (the report uses the results already on disk)

A failing part does not stop the others: the report is still written from whatever results exist,
and the exit status says that something failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("turn_cost", "summary", "end_to_end", "burst", "topologies", "report")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--skip", action="append", default=[], choices=PARTS, help="a part to leave out")
    args = parser.parse_args()
    failed = []
    for part in PARTS:
        if part in args.skip:
            continue
        load = os.getloadavg()[0]
        print(f"[bench] {part} (load average {load:.2f} on {os.cpu_count()} cores)", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", f"bench.{part}"], cwd=ROOT, check=False).returncode
        print(f"[bench] {part}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(part)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
