"""Storage benchmark: dataset write throughput against raw S3 puts of the same bytes, and the size and
accuracy of the sparse top-k logprob layout.

    python bench/storage_bench.py [--megabytes 256] [--repeats 3]

`run()` returns one dict per result row (metric, stillhouse, baseline, value, target, passed);
`main()` runs it and prints the table.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from _table import print_grid, verdict
from s3_server import SeaweedFS, seaweedfs_server

from stillhouse.common.datasets import sparse_logprobs as sparse
from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.store import (
    DEFAULT_ENCODE_THREADS,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_UPLOAD_THREADS,
    DatasetReader,
    DatasetWriter,
    parquet_encodings,
)
from stillhouse.common.objectstore.open_store import open_object_store

MB = 1_000_000
MIB = 1024 * 1024
# The writer's default, and a smaller size for a dataset of a few hundred MB written all at once: the
# biggest shard's encoding (one core) is the part of a write that no upload overlaps.
SHARD_SIZES = (DEFAULT_MAX_SHARD_BYTES, 16 * MIB)
BUCKET = "bench"
VOCAB_SIZE = 151_936  # Qwen2.5's vocabulary: ids need more than 16 bits
TOP_K = 20
ZIPF_EXPONENT = 1.1
ZIPF_OFFSET = 2.7

GENERATOR_NOTE = (
    "Synthetic teacher: 151,936 token ids with Zipf(1.1) frequencies over a random id order. At each step,\n"
    "candidate tokens drawn from that Zipf law (128; 64 for the write rows) get logit log p + 3*Gumbel,\n"
    "every other token log p - 6, and all logits are divided by a per-step temperature exp(N(0, 0.5)), so\n"
    "entropy varies (median top-1 probability ~0.8, top-20 mass ~0.95, ~0.85 nats). Size and error: full\n"
    "[T, V] logits through SparseLogprobs.from_dense_logits, errors against a float64 log-softmax. Writes:\n"
    "teacher rows (prompt and response text of Zipf-distributed words, T ~ lognormal around 250 tokens,\n"
    "k=20 logprobs) all in memory up front, written to a SeaweedFS S3 API on the same machine."
)


@dataclass
class SyntheticTeacher:
    """An LM-shaped distribution over a large vocabulary, cheap to sample (see GENERATOR_NOTE)."""

    vocab_size: int = VOCAB_SIZE
    seed: int = 0
    candidates: int = 128
    background_offset: float = 6.0
    gumbel_scale: float = 3.0
    temperatures: np.ndarray = field(init=False)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.prior_by_rank = -ZIPF_EXPONENT * np.log(np.arange(self.vocab_size) + ZIPF_OFFSET)
        self.prior_by_rank -= np.log(np.exp(self.prior_by_rank).sum())
        self.id_of_rank = self.rng.permutation(self.vocab_size)
        self.prior = np.empty(self.vocab_size)
        self.prior[self.id_of_rank] = self.prior_by_rank
        # A fixed set of temperatures, so that the mass of the non-candidate tokens is exact per step.
        normal = statistics.NormalDist(0.0, 0.5)
        self.temperatures = np.exp([normal.inv_cdf((index + 0.5) / 64) for index in range(64)])
        self.prior_mass = np.array([np.exp(self.prior / tau).sum() for tau in self.temperatures])

    def _zipf_ranks(self, shape: tuple[int, ...]) -> np.ndarray:
        """Ranks drawn from p(r) ~ (r + offset)^-exponent, by inverting its continuous CDF."""
        power = 1.0 - ZIPF_EXPONENT
        low, high = ZIPF_OFFSET**power, (self.vocab_size + ZIPF_OFFSET) ** power
        uniform = self.rng.random(shape, dtype=np.float32)
        ranks = (low + uniform * (high - low)) ** (1.0 / power) - ZIPF_OFFSET
        return np.clip(ranks, 0, self.vocab_size - 1).astype(np.int64)

    def _steps(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Temperature index, candidate ids (sorted) and candidate logits before temperature (-inf for a
        repeated candidate) of each step."""
        tau_index = self.rng.integers(0, len(self.temperatures), steps)
        ids = np.sort(self.id_of_rank[self._zipf_ranks((steps, self.candidates))], axis=1)
        uniform = np.maximum(self.rng.random(ids.shape, dtype=np.float32), np.float32(1e-30))
        scores = self.prior[ids].astype(np.float32) - self.gumbel_scale * np.log(-np.log(uniform))
        scores[:, 1:][ids[:, 1:] == ids[:, :-1]] = -np.inf
        return tau_index, ids, scores

    def dense_logits(self, steps: int) -> np.ndarray:
        tau_index, ids, scores = self._steps(steps)
        tau = self.temperatures[tau_index][:, None].astype(np.float32)
        background = (self.prior - self.background_offset).astype(np.float32)
        logits = background[None, :] / tau
        valid = np.isfinite(scores)
        rows = np.repeat(np.arange(steps)[:, None], ids.shape[1], axis=1)
        logits[rows[valid], ids[valid]] = (scores / tau)[valid]
        return logits

    def sparse(self, steps: int, k: int) -> sparse.SparseLogprobs:
        """Top-k of the same kind of step, taken among the candidates, without a [T, V] array."""
        tau_index, ids, scores = self._steps(steps)
        tau = self.temperatures[tau_index][:, None]
        logits = scores / tau.astype(np.float32)
        valid = np.isfinite(scores)
        candidate_prior_mass = np.where(valid, np.exp(self.prior[ids] / tau), 0.0).sum(axis=1)
        background = np.exp(-self.background_offset / tau[:, 0]) * (
            self.prior_mass[tau_index] - candidate_prior_mass
        )
        peak = logits.max(axis=1, keepdims=True)
        total = np.exp(logits - peak).sum(axis=1, dtype=np.float64) + background * np.exp(-peak[:, 0])
        logprobs = logits - peak - np.log(total)[:, None].astype(np.float32)
        best = np.argpartition(-logprobs, k, axis=1)[:, :k]
        best = np.take_along_axis(
            best, np.argsort(-np.take_along_axis(logprobs, best, axis=1), axis=1), axis=1
        )
        topk_logprobs = np.take_along_axis(logprobs, best, axis=1)
        topk_ids = np.take_along_axis(ids, best, axis=1).astype(np.int32)
        probabilities = np.exp(topk_logprobs.astype(np.float64))
        tail = np.log(np.maximum(1.0 - probabilities.sum(axis=1), 1e-30))
        # The generated token: sampled from the top k.
        cumulative = np.cumsum(probabilities, axis=1)
        draw = self.rng.random(steps) * cumulative[:, -1]
        chosen = np.minimum((cumulative < draw[:, None]).sum(axis=1), k - 1)
        token_ids = topk_ids[np.arange(steps), chosen]
        return sparse.SparseLogprobs(token_ids, topk_ids, topk_logprobs, tail.astype(np.float32))


# --- teacher rows ----------------------------------------------------------------------------------------


def teacher_schema(k: int) -> pa.Schema:
    return sparse.arrow_schema(
        k,
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("response", pa.string(), nullable=False),
            pa.field("finish_reason", pa.string(), nullable=False),
        ],
    )


def teacher_batches(
    teacher: SyntheticTeacher, target_tokens: int, k: int, rows_per_batch: int = 256
) -> list[pa.Table]:
    """Rows as a teacher service would hand them over, in batches."""
    rng = np.random.default_rng(teacher.seed + 1)
    words = np.array(
        ["".join(rng.choice(list("etaoinshrdlcumwfgypbvkjxqz"), rng.integers(1, 11))) for _ in range(20_000)]
    )
    word_p = 1.0 / (np.arange(len(words)) + 2.7)
    word_p /= word_p.sum()
    schema = teacher_schema(k)
    batches, tokens, row_number = [], 0, 0
    while tokens < target_tokens:
        lengths = np.clip(rng.lognormal(np.log(250), 0.7, rows_per_batch), 16, 2048).astype(int)
        steps = teacher.sparse(int(lengths.sum()), k)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        rows = [
            sparse.SparseLogprobs(
                steps.token_ids[a:b], steps.topk_ids[a:b], steps.topk_logprobs[a:b], steps.tail_logprob[a:b]
            )
            for a, b in itertools.pairwise(starts)
        ]
        prompt_words = rng.choice(len(words), (rows_per_batch, 120), p=word_p)
        response_words = rng.choice(len(words), int(lengths.sum() * 3 // 4) + 1, p=word_p)
        word_starts = starts * 3 // 4
        columns = {
            "prompt_id": pa.array([f"p-{row_number + i:09d}" for i in range(rows_per_batch)]),
            "prompt": pa.array([" ".join(words[ids[: 20 + i % 100]]) for i, ids in enumerate(prompt_words)]),
            "response": pa.array(
                [" ".join(words[response_words[a:b]]) for a, b in itertools.pairwise(word_starts)]
            ),
            "finish_reason": pa.array(["stop"] * rows_per_batch),
            **sparse.rows_to_arrow(rows, k),
        }
        batches.append(pa.table(columns, schema=schema))
        tokens += int(lengths.sum())
        row_number += rows_per_batch
    return batches


# --- (a) write throughput --------------------------------------------------------------------------------


@dataclass
class Timed:
    """One run: wall seconds, and CPU seconds of this process and of the S3 server."""

    megabytes: float
    wall: float
    client_cpu: float
    server_cpu: float

    @property
    def mbps(self) -> float:
        return self.megabytes / self.wall


class CpuClock:
    """Wall time and the CPU time of this process (every thread) and of the server's processes."""

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)

    def _server_cpu(self) -> float:
        total = 0.0
        for process in [self.server, *self.server.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def _own_cpu(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._own_cpu(), self._server_cpu()

    def stop(self, started: tuple[float, float, float], size_bytes: int) -> Timed:
        wall, own, server = started
        return Timed(
            size_bytes / MB,
            time.perf_counter() - wall,
            self._own_cpu() - own,
            self._server_cpu() - server,
        )


def bench_write_throughput(
    server: SeaweedFS, batches: list[pa.Table], repeats: int, shard_sizes: tuple[int, ...] = SHARD_SIZES
) -> list[dict]:
    """For each shard size: DatasetWriter (defaults otherwise) against put_object of the same shard
    bytes, alternating, `repeats` times each; the medians and their ratio. Then the best ratio this
    machine's cores allow: the writer's CPU time and the server's, spread over every core with nothing
    idle, against the baseline's wall time."""
    store = open_object_store(server.settings(BUCKET))
    store.ensure_bucket()
    client = server.client()
    clock = CpuClock(server.pid)
    schema = batches[0].schema
    lineage = Lineage(job_id="bench", stage="teacher", input_ids=[], code_version="bench")
    cores = len(os.sched_getaffinity(0))
    results = []
    for max_shard_bytes in shard_sizes:
        ours: list[Timed] = []
        theirs: list[Timed] = []
        for attempt in range(repeats):
            dataset_id = f"bench/write-{max_shard_bytes}-{attempt}"
            started = clock.start()
            with DatasetWriter(store, dataset_id, schema, lineage, max_shard_bytes=max_shard_bytes) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                manifest = writer.commit()
            ours.append(clock.stop(started, manifest.size_bytes))

            reader = DatasetReader(store, dataset_id)
            shard_bytes = [reader.read_shard_bytes(index) for index in range(len(manifest.shards))]
            started = clock.start()
            for index, data in enumerate(shard_bytes):
                client.put_object(BUCKET, f"raw/{dataset_id}/{index:05d}", io.BytesIO(data), len(data))
            theirs.append(clock.stop(started, sum(map(len, shard_bytes))))
        ours_mbps = statistics.median(run.mbps for run in ours)
        theirs_mbps = statistics.median(run.mbps for run in theirs)
        ratio = ours_mbps / theirs_mbps
        ours_cpu = statistics.median(run.client_cpu + run.server_cpu for run in ours)
        ceiling = statistics.median(run.wall for run in theirs) * cores / ours_cpu
        default = " (default)" if max_shard_bytes == DEFAULT_MAX_SHARD_BYTES else ""
        shards = f"{max_shard_bytes // MIB} MiB shards{default}"
        results.append(
            {
                "metric": f"write MB/s, {shards}: "
                f"{manifest.size_bytes / MB:.0f} MB in {len(manifest.shards)} shards, median of {repeats}",
                "stillhouse": round(ours_mbps, 1),
                "baseline": round(theirs_mbps, 1),
                "value": round(ratio, 3),
                "target": ">= 0.9x",
                "passed": ratio >= 0.9,
                "detail": {
                    "stillhouse_runs": [round(run.mbps, 1) for run in ours],
                    "baseline_runs": [round(run.mbps, 1) for run in theirs],
                    "encode_threads": DEFAULT_ENCODE_THREADS,
                    "upload_threads": DEFAULT_UPLOAD_THREADS,
                },
            }
        )
        results.append(
            {
                "metric": f"  best ratio {cores} cores allow, {shards}: CPU-s per run, writer + S3 server",
                "stillhouse": f"{_median_cpu(ours)}",
                "baseline": f"{_median_cpu(theirs)}",
                "value": round(ceiling, 3),
                "target": "(context)",
                "passed": None,
            }
        )
    return results


def _median_cpu(runs: list[Timed]) -> str:
    client = statistics.median(run.client_cpu for run in runs)
    server = statistics.median(run.server_cpu for run in runs)
    return f"{client:.2f} + {server:.2f}"


# --- (b, c) sparse layout --------------------------------------------------------------------------------


def bench_sparse_layout(teacher: SyntheticTeacher, num_tokens: int, ks: tuple[int, ...]) -> list[dict]:
    """Per k: bytes/token of the layout in Parquet (zstd), and the worst probability error of what
    reads back from that Parquet, top-k entries and tail, against a float64 log-softmax."""
    steps_per_row = 256
    responses: dict[int, list[sparse.SparseLogprobs]] = {k: [] for k in ks}
    exact_topk: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for _ in range(max(1, num_tokens // steps_per_row)):
        logits = teacher.dense_logits(steps_per_row)
        exact = logits.astype(np.float64)
        exact -= exact.max(axis=1, keepdims=True)
        exact -= np.log(np.exp(exact).sum(axis=1, keepdims=True))
        generated = exact.argmax(axis=1)
        for k in ks:
            response = sparse.SparseLogprobs.from_dense_logits(logits, generated, k)
            responses[k].append(response)
            exact_topk[k].append(np.take_along_axis(exact, response.topk_ids, axis=1))
    results, errors = [], {}
    for k in ks:
        schema = sparse.arrow_schema(k)
        data = _parquet(
            pa.table(sparse.rows_to_arrow(responses[k], k), schema=schema), parquet_encodings(schema)
        )
        ours = sparse.bytes_per_token(data)
        naive = sparse.bytes_per_token(_parquet(_naive(responses[k]), {}))
        stored = [
            sparse.SparseLogprobs.from_arrow(row, k)
            for row in pq.read_table(pa.BufferReader(data)).to_pylist()
        ]
        worst = 0.0
        for row, true in zip(stored, exact_topk[k], strict=True):
            true = np.maximum(true, sparse.LOGPROB_FLOOR)
            worst = max(
                worst,
                float(np.abs(np.exp(row.topk_logprobs.astype(np.float64)) - np.exp(true)).max(initial=0)),
            )
            true_tail = np.maximum(1.0 - np.exp(true).sum(axis=1), 0.0)
            worst = max(worst, float(np.abs(np.exp(row.tail_logprob.astype(np.float64)) - true_tail).max()))
        errors[k] = worst
        results.append(
            {
                "metric": f"sparse logprobs bytes/token, k={k} (zstd)",
                "stillhouse": round(ours, 1),
                "baseline": round(naive, 1),
                "value": round(ours, 1),
                "target": "<= 100" if k == TOP_K else "(context)",
                "passed": bool(ours <= 100) if k == TOP_K else None,
            }
        )
    for k in ks:
        results.append(
            {
                "metric": f"max |exp(stored) - p|, k={k}, top-k and tail, read back",
                "stillhouse": errors[k],
                "baseline": None,
                "value": errors[k],
                "target": "<= 1e-3",
                "passed": bool(errors[k] <= 1e-3),
            }
        )
    return results


def _parquet(table: pa.Table, options: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **options)
    return buffer.getvalue()


def _naive(responses: list[sparse.SparseLogprobs]) -> pa.Table:
    """The obvious layout: the same lists, logprobs as plain float32."""
    return pa.table(
        {
            "token_ids": pa.array([r.token_ids for r in responses], pa.list_(pa.int32())),
            "topk_ids": pa.array([r.topk_ids.reshape(-1) for r in responses], pa.list_(pa.int32())),
            "topk_logprobs": pa.array(
                [r.topk_logprobs.reshape(-1) for r in responses], pa.list_(pa.float32())
            ),
            "tail_logprob": pa.array([r.tail_logprob for r in responses], pa.list_(pa.float32())),
        }
    )


# --- the table -------------------------------------------------------------------------------------------


def run(megabytes: int = 256, repeats: int = 3, layout_tokens: int = 8192) -> list[dict]:
    teacher = SyntheticTeacher(seed=0)
    results = bench_sparse_layout(teacher, layout_tokens, (5, TOP_K, 64))
    # About 64 bytes of Parquet per token (text and k=20 logprobs).
    batches = teacher_batches(SyntheticTeacher(seed=1, candidates=64), megabytes * MB // 64, TOP_K)
    with (
        tempfile.TemporaryDirectory(prefix="storage-bench-") as home,
        seaweedfs_server(Path(home), access_key="stillhouse-bench") as server,
    ):
        results = bench_write_throughput(server, batches, repeats) + results
    return results


def print_table(results: list[dict]) -> None:
    headers = ["metric", "stillhouse", "baseline", "ratio/value", "target", "pass"]
    rows = [
        [
            str(row["metric"]),
            _cell(row["stillhouse"]),
            _cell(row["baseline"]),
            _cell(row["value"]),
            str(row["target"]),
            verdict(row["passed"]),
        ]
        for row in results
    ]
    print_grid(headers, rows)
    print()
    print("baseline: write = minio put_object of the same shard bytes, one object after another;")
    print("bytes/token = the same lists with float32 logprobs and pyarrow's default encodings, zstd.")
    print(GENERATOR_NOTE)
    for row in results:
        if "detail" in row:
            print(f"{row['metric'].split(':')[0]}: {row['detail']}")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        return f"{value:.2e}"
    return str(value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256, help="Parquet to write per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    results = run(args.megabytes, args.repeats, args.layout_tokens)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
