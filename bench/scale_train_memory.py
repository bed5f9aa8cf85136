"""Training data at scale: the peak resident memory of one training worker's data path, as the answers
dataset grows from 10^4 to 10^6 rows.

    cd bench && python scale_train_memory.py [--sizes 10000 100000 1000000]

For each size, a synthetic answers dataset (SmolLM2's tokenizer, token ids below 1,000, top-20
logprobs, 32-token answers; `tests/support/synthetic_answers.py`) is committed to an object store in
a local folder. A fresh process then runs what a training worker does with its data for one whole
epoch: `WorkerData.load` (the first pass that counts the rows and records example lengths), the step
count of the epoch, and every step's micro-batches collated into the tensors the loss takes (top-k
included). No model runs: a tiny student over 3*10^7 tokens would take hours on a CPU, and the
model's memory does not depend on the dataset anyway. The figure is the process's peak resident
memory (the kernel's high-water mark, VmHWM), libraries included. Target: at most 1.2x from the
smallest size to the largest.

Beside it, for the sizes up to `--old-path-max-rows`, the same for the old data path: every example
tokenized into a list first (top-k as float32), then packed and collated.

`run()` returns one dict per size; `main()` prints them with `print_grid`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _memory import peak_rss_bytes
from _table import print_grid, verdict
from synthetic_answers import write_synthetic_answers

from stillhouse.common.datasets.store import delete_dataset
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings

TARGET_RATIO = 1.2
MAX_SEQ_LEN = 256
BATCH_TOKENS = 16_384
MICRO_BATCH_TOKENS = 8_192
TOP_K = 20
SHARD_ROWS = 100_000
SHUFFLE_BUFFER = 4096  # TrainRun's default
OLD_PATH_MAX_ROWS = 100_000


def run(
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), old_path_max_rows: int = OLD_PATH_MAX_ROWS
) -> list[dict]:
    """One dict per size: rows, peak RSS in MB of the streaming data path (and of the old one where
    measured), the ratio of the streaming figure to the smallest size's, and whether that is within
    TARGET_RATIO."""
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-train-memory-") as scratch:
        work = Path(scratch)
        settings = ObjectStoreSettings(backend="local", bucket="bench", local_root=work / "objects")
        store = open_object_store(settings)
        store.ensure_bucket()
        tokenizer_dir = _save_tokenizer(work / "tokenizer")
        for size in sorted(sizes):
            dataset = f"bench/scale-{size}/teacher/train"
            write_synthetic_answers(store, dataset, size, max_shard_rows=SHARD_ROWS, top_k=TOP_K)
            streaming = _measure("streaming", settings, dataset, tokenizer_dir, work / f"streaming-{size}")
            old = (
                _measure("old", settings, dataset, tokenizer_dir, work / f"old-{size}")
                if size <= old_path_max_rows
                else None
            )
            delete_dataset(store, dataset)
            if streaming["examples"] < size:
                raise RuntimeError(f"the streaming path read {streaming['examples']} of {size} rows")
            results.append(
                {
                    "rows": size,
                    "peak_rss_mb": streaming["peak_rss_mb"],
                    "old_path_peak_rss_mb": old and old["peak_rss_mb"],
                }
            )
    smallest = results[0]["peak_rss_mb"]
    for result in results:
        result["ratio"] = result["peak_rss_mb"] / smallest
        result["target"] = f"<= {TARGET_RATIO}x"
        result["passed"] = result["ratio"] <= TARGET_RATIO
    return results


def _save_tokenizer(folder: Path) -> Path:
    from stillhouse.common.models.model_loading import (
        EMBEDDED_TEACHER,
        load_tokenizer,
        resolve_model_reference,
    )

    load_tokenizer(resolve_model_reference(EMBEDDED_TEACHER)).save_pretrained(folder)
    return folder


def _measure(path: str, settings: ObjectStoreSettings, dataset: str, tokenizer_dir: Path, work: Path) -> dict:
    """Run one data path over `dataset` in a fresh process; its figures."""
    arguments = [path, settings.model_dump_json(), dataset, str(tokenizer_dir), str(work)]
    result = subprocess.run(
        [sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {path} data path failed on {dataset}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


# --- the child process --------------------------------------------------------------------------------


def _child(path: str, settings_json: str, dataset: str, tokenizer_dir: str, work: str) -> None:
    from transformers import AutoTokenizer

    from stillhouse.trainer.data import BatchPlan, collate

    store = open_object_store(ObjectStoreSettings.model_validate_json(settings_json))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    plan = BatchPlan.create(BATCH_TOKENS, MAX_SEQ_LEN, 1, MICRO_BATCH_TOKENS)
    steps = _streaming_steps if path == "streaming" else _old_steps
    examples = tokens = 0
    for step_examples, micro_batches in steps(store, dataset, tokenizer, plan, Path(work)):
        for micro_rows in micro_batches:
            batch = collate(step_examples, micro_rows, pad_token_id=0, teacher_k=TOP_K)
            tokens += batch.tokens
        examples += sum(len(row) for micro_rows in micro_batches for row in micro_rows)
    print(json.dumps({"examples": examples, "tokens": tokens, "peak_rss_mb": peak_rss_bytes() / 2**20}))


def _streaming_steps(store, dataset, tokenizer, plan, work):
    from stillhouse.trainer.worker_data import WorkerData

    data = WorkerData.load(
        store,
        dataset,
        tokenizer,
        rank=0,
        world=1,
        use_teacher_tokens=True,
        require_teacher=True,
        max_seq_len=MAX_SEQ_LEN,
        seed=0,
        work_dir=work,
        shuffle_buffer=SHUFFLE_BUFFER,
    )
    count = plan.steps_per_epoch(data.packed_row_count(0))
    for _, step in zip(range(count), data.steps(0, plan), strict=False):
        yield step.examples, step.micro_batches


def _old_steps(store, dataset, tokenizer, plan, work):
    """As the loop read its data before streaming: every example in a list, then a permutation packed."""
    import numpy as np

    from stillhouse.trainer.data import pack_rows, read_answer_rows, tokenize_answers

    examples = list(
        tokenize_answers(
            read_answer_rows(store, dataset), tokenizer, use_teacher_tokens=True, max_seq_len=MAX_SEQ_LEN
        )
    )
    rows = pack_rows(examples, np.random.default_rng([0, 0]).permutation(len(examples)).tolist(), MAX_SEQ_LEN)
    for step in range(plan.steps_per_epoch(len(rows))):
        step_rows = rows[step * plan.rows_per_step : (step + 1) * plan.rows_per_step]
        yield (
            examples,
            [
                step_rows[start : start + plan.micro_batch_rows]
                for start in range(0, len(step_rows), plan.micro_batch_rows)
            ],
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--old-path-max-rows", type=int, default=OLD_PATH_MAX_ROWS)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return []
    results = run(tuple(args.sizes), args.old_path_max_rows)
    headers = [
        "rows",
        "peak RSS MB (streaming)",
        "ratio to smallest",
        "target",
        "passed",
        "peak RSS MB (old path)",
    ]
    print_grid(
        headers,
        [
            [
                f"{result['rows']:,}",
                f"{result['peak_rss_mb']:.0f}",
                f"{result['ratio']:.2f}x",
                result["target"],
                verdict(result["passed"]),
                "-" if result["old_path_peak_rss_mb"] is None else f"{result['old_path_peak_rss_mb']:.0f}",
            ]
            for result in results
        ],
    )
    return results


if __name__ == "__main__":
    main()
