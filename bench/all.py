"""Every benchmark of the project, one after another, and one table of their ratios against baselines.

    cd bench && ../.venv/bin/python all.py           # the sizes below: about an hour on 2 cores
    cd bench && ../.venv/bin/python all.py dedup train

Each benchmark measures its baseline side by side in the same run and prints its own table; this adds
the summary. The GPU benchmark (`gpu.sh`) is not here: it needs a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from collections.abc import Callable

from _table import print_grid, summary_figure, verdict

# name -> (module, arguments): sizes that keep the whole run to minutes while each ratio stays stable.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "storage": ("storage_bench", ["--megabytes", "128", "--repeats", "3"]),
    "teacher_http": ("teacher_http_bench", ["--prompts", "2000"]),
    "teacher_local": ("teacher_local_bench", []),
    "dedup": ("dedup_bench", ["--prompts", "100000"]),
    "train": ("train_bench", []),
    "quality": ("quality_bench", []),
}


def _passed(row: dict) -> bool | None:
    return row.get("passed", row.get("pass"))


def summary_rows(name: str, rows: list[dict]) -> list[list[str]]:
    """The rows that carry a target, as (benchmark, metric, value, target, pass)."""
    return [
        [name, str(row["metric"]), summary_figure(row), str(row["target"]), verdict(_passed(row))]
        for row in rows
        if _passed(row) is not None
    ]


def run_one(name: str, main: Callable[[list[str]], list[dict]], argv: list[str]) -> list[list[str]]:
    print(f"\n=== {name} {' '.join(argv)}", flush=True)
    try:
        return summary_rows(name, main(argv))
    except Exception:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        return [[name, "(failed: see above)", "", "", verdict(False)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"run only these ({', '.join(BENCHMARKS)})")
    names = parser.parse_args().only or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    rows: list[list[str]] = []
    for name in names:
        module, argv = BENCHMARKS[name]
        rows += run_one(name, importlib.import_module(module).main, argv)
    print("\n=== summary")
    print_grid(["benchmark", "metric", "ratio/value", "target", "pass"], rows)


if __name__ == "__main__":
    main()
