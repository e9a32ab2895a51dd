"""Run benchmarks and print a table of ratios against baselines measured in the same run.

    python -m benchmarks                 # all benchmarks
    python -m benchmarks construct dedup # some of them
    python -m benchmarks --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

# name -> module with `run() -> list[dict]`; each dict: benchmark, persllm, baseline, unit, ratio, higher_is_better, note
BENCHMARKS = {
    "construct": "benchmarks.construct_throughput",
    "dedup": "benchmarks.dedup",
    "training": "benchmarks.training",
    "ipip": "benchmarks.ipip",
    "serve": "benchmarks.serve",
    "load": "benchmarks.serve:run_load",
    "disconnects": "benchmarks.serve_load",
    "recipe": "benchmarks.recipe",
    "exports": "benchmarks.exports",
}
# hours of training; pass/fail checks of the server and of the exports (the latter needs the tools' venvs): run only
# when named
ON_DEMAND = ("recipe", "disconnects", "exports")


def main() -> None:
    parser = argparse.ArgumentParser(description="persllm benchmarks")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all but {', '.join(ON_DEMAND)}; "
                                                 f"known: {', '.join(BENCHMARKS)})")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"), help="where to write results")
    args = parser.parse_args()
    names = args.names or [n for n in BENCHMARKS if n not in ON_DEMAND]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    rows: list[dict] = []
    started = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        module, _, func = BENCHMARKS[name].partition(":")
        results = getattr(importlib.import_module(module), func or "run")()
        for row in results:
            row.setdefault("seconds", round(time.monotonic() - t0, 1))  # a benchmark may time its own window
        rows.extend(results)
    _print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                     "total_seconds": round(time.monotonic() - started, 1), "results": rows},
                                    indent=2) + "\n")
    print(f"\nresults written to {args.json} ({time.monotonic() - started:.0f} s)")


def _print_table(rows: list[dict]) -> None:
    header = f"{'benchmark':<44} {'persllm':>14} {'baseline':>14} {'ratio':>8}  baseline is"
    print("\n" + header + "\n" + "-" * len(header) + "-" * 20)
    for r in rows:
        print(f"{r['benchmark']:<44} {r['persllm']:>10.3g} {r['unit']:<3} {r['baseline']:>10.3g} {r['unit']:<3} "
              f"{r['ratio']:>7.1f}x  {r['baseline_name']}" + (f"  ({r['note']})" if r.get("note") else ""))


if __name__ == "__main__":
    main()
