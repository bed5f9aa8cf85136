"""Scale benchmark: what a job costs as it grows, in one run on this machine.

    python bench/scale_bench.py [--quick] [section ...]

Sections (each measures its baseline side by side in the same run):
- client_cpu: the teacher client's CPU per 110 KB answer, beside the other HTTP clients measured;
- teacher_fanout: the teacher stage fanned out over a local Ray head with 2 CPUs against the same stage
  in one process, on the same prompts, the fake OpenAI server answering with latency;
- train_memory: a training worker's peak RSS as its answers dataset grows from 10^4 to 10^6 rows;
- prompts: the prompts stage on 10^6 synthetic prompts, wall time and peak memory against the chart's
  pod limits.

`--quick` runs every section at a tenth of its size (for a smoke run; the targets are for the full sizes).
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from typing import Any

from _table import print_grid

# name -> (module, full-size arguments, quick arguments)
SECTIONS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "client_cpu": ("scale_client_cpu", {}, {"answers": 400}),
    "teacher_fanout": ("scale_teacher_fanout", {"prompts": 20_000}, {"prompts": 2_000}),
    "train_memory": ("scale_train_memory", {}, {"sizes": (10_000, 100_000)}),
    "prompts": ("scale_prompts", {}, {"prompts": 100_000}),
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return "" if value is None else str(value)


def print_rows(rows: list[dict[str, Any]]) -> None:
    headers: list[str] = []
    for row in rows:
        headers += [key for key in row if key not in headers]
    print_grid(headers, [[_cell(row.get(header)) for header in headers] for row in rows])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", metavar="SECTION", help=f"run only these ({', '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="every section at a tenth of its size")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    results: list[dict] = []
    for name in args.only or list(SECTIONS):
        module, full, quick = SECTIONS[name]
        print(f"\n=== {name}", flush=True)
        try:
            rows = importlib.import_module(module).run(**(quick if args.quick else full))
        except Exception:  # one broken section must not hide the others' figures
            traceback.print_exc()
            rows = [{"metric": f"{name} (failed: see above)", "pass": False, "target": "runs"}]
        print_rows(rows)
        results += [{"section": name, **row} for row in rows]
    return results


if __name__ == "__main__":
    main()
