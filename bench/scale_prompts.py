"""Scale benchmark of the prompts stage: a seed source of 10^6 prompts, with exact and near duplicates,
through the whole stage (read, clean, deduplicate, split, write both datasets) in this machine's
processes, with a local object store.

    cd bench && ../.venv/bin/python scale_prompts.py [--prompts 1000000] [--shard-rows 10000]

The prompts are `dedup_bench.synthetic_prompts` (70% fresh, 15% exact copies with case and spacing
changed, 15% near-duplicates of an earlier prompt), written as one JSONL file. Two runs, each in a fresh
interpreter (so that each peak RSS is its own), one after the other:

- one shard: `fanout.shardRows` above the input size, so one shard prepares every prompt, then the merge;
- sharded: `--shard-rows` rows per shard (the default: 100 shards of 10^6), run in this process
  (`InProcessFanout`), then the merge over all of them in shard order.

Both must give the same datasets (rows compared by a hash of the train and holdout datasets). Each row
reports wall seconds, prompts per second and the peak RSS of the stage's process, and the peak is
compared with the memory limit of the prompts pod in the chart (`prompts.resources.limits.memory`) and of
a Ray CPU worker (the chart's `rayCluster.cpuWorkers`, else 4Gi): "within" or "over".
`run()` returns one dict per result row; `main()` prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _table import print_grid
from dedup_bench import synthetic_prompts

VALUES = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "stillhouse" / "values.yaml"
DEFAULT_CPU_WORKER_LIMIT = "4Gi"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}

# Runs in a fresh interpreter: argv = folder, shard_rows. Prints one JSON line.
STAGE = """
import asyncio, hashlib, json, sys, time
from pathlib import Path
from _memory import peak_rss_bytes
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.input_roots import InputRoots
from stillhouse.common.jobspec import PromptsSpec
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.prompts.shards import ShardResources
from stillhouse.prompts.stage import GeneratePromptsRun

class Quiet:
    def update(self, **_): pass

folder, shard_rows = Path(sys.argv[1]), int(sys.argv[2])
store = LocalObjectStore(folder / f"objects-{shard_rows}", "stillhouse")
spec = PromptsSpec.model_validate({"sources": [{"path": str(folder / "seeds.jsonl")}], "seed": 1})
run = GeneratePromptsRun(
    resources=ShardResources(store, InputRoots.of([folder])), spec=spec, holdout_fraction=0.02,
    job_id="job-scale", progress=Quiet(), fanout=FanoutSettings(shard_rows=shard_rows),
)
started = time.perf_counter()
result = asyncio.run(run.run())
seconds = time.perf_counter() - started
digest = hashlib.sha256()
for reference in (result.train, result.holdout):
    for batch in DatasetReader(store, reference.dataset_id).read_batches(["prompt_id"]):
        digest.update("".join(batch.column(0).to_pylist()).encode())
print(json.dumps({
    "seconds": seconds, "peak_rss": peak_rss_bytes(),
    "collected": result.collected, "kept": result.train.num_rows + result.holdout.num_rows,
    "removed": dict(result.removed_by_rule), "datasets": digest.hexdigest(),
}))
"""


def memory_bytes(quantity: str) -> int:
    for suffix, factor in UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def chart_limits() -> dict[str, str]:
    values = yaml.safe_load(VALUES.read_text())
    cpu_workers = (values.get("rayCluster") or {}).get("cpuWorkers") or {}
    cpu_limit = ((cpu_workers.get("resources") or {}).get("limits") or {}).get("memory")
    return {
        "prompts pod": values["prompts"]["resources"]["limits"]["memory"],
        "Ray CPU worker": cpu_limit or DEFAULT_CPU_WORKER_LIMIT,
    }


def write_source(path: Path, prompts: int) -> None:
    corpus = synthetic_prompts(prompts, seed=0)
    with path.open("w") as out:
        for text in corpus.texts:
            out.write(json.dumps({"prompt": text}) + "\n")


def run_stage(folder: Path, shard_rows: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", STAGE, str(folder), str(shard_rows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,  # `-c` puts the working folder on the path: `_memory`
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(prompts: int = 1_000_000, shard_rows: int = 10_000) -> list[dict]:
    limits = chart_limits()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="scale-prompts-") as name:
        folder = Path(name)
        started = time.perf_counter()
        write_source(folder / "seeds.jsonl", prompts)
        print(f"source of {prompts} prompts written in {time.perf_counter() - started:.0f} s", flush=True)
        outcomes = {}
        for label, rows_per_shard in (("one shard", 10_000_000), (f"{shard_rows}-row shards", shard_rows)):
            outcome = run_stage(folder, rows_per_shard)
            outcomes[label] = outcome
            shards = -(-prompts // rows_per_shard)
            rows.append(
                {
                    "metric": f"stage, {label} ({shards})",
                    "seconds": outcome["seconds"],
                    "prompts_per_second": prompts / outcome["seconds"],
                    "peak_rss_mib": outcome["peak_rss"] / 2**20,
                    "kept": outcome["kept"],
                    "removed": ", ".join(
                        f"{rule} {count:,}" for rule, count in sorted(outcome["removed"].items()) if count
                    ),
                }
            )
            print(f"{label}: {outcome['seconds']:.1f} s", flush=True)
        same = len({outcome["datasets"] for outcome in outcomes.values()}) == 1
        rows.append({"metric": "same datasets, one shard and many", "value": str(same), "passed": same})
        peak = max(outcome["peak_rss"] for outcome in outcomes.values())
        for where, limit in limits.items():
            within = peak <= memory_bytes(limit)
            rows.append(
                {
                    "metric": f"peak RSS vs {where} limit {limit}",
                    "value": f"{peak / 2**20:.0f} MiB: {'within' if within else 'over'}",
                    "passed": within,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    arguments = parser.parse_args(argv)
    rows = run(arguments.prompts, arguments.shard_rows)
    grid = []
    for row in rows:
        if "seconds" in row:
            value = (
                f"{row['seconds']:.1f} s, {row['prompts_per_second']:,.0f} prompts/s, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB, kept {row['kept']:,}"
            )
            grid.append([row["metric"], value, "-"])
        else:
            grid.append([row["metric"], row["value"], "yes" if row["passed"] else "NO"])
    print_grid(["metric", "value", "pass"], grid)
    return rows


if __name__ == "__main__":
    main()
