"""Dedup benchmark: prompts per second of `PromptCleaner` against datasketch used directly in a plain
loop, on the same synthetic prompts, the same shingling and the same threshold, in one run.

    cd bench && ../.venv/bin/python dedup_bench.py [--prompts 100000] [--baseline-prompts N] [--threshold 0.8]

Prompts (seeded): words drawn from a 20,000-word vocabulary with Zipf(1.1) frequencies, lengths
log-normal around 25 words (3 to 300). 70% are fresh; 15% are exact copies of an earlier prompt with
case and spacing changed; 15% are near-duplicates of an earlier prompt of at least 20 words: one word
substituted, inserted or deleted per 25 words (a Jaccard similarity of word bigrams around 0.85-0.95).

- baseline: for each prompt, `MinHash(num_perm=128)`, `m.update(shingle.encode())` for each shingle,
  `lsh.query(m)` on a `MinHashLSH(threshold, num_perm=128)`, and `lsh.insert` when nothing matches.
  Shingles: the word bigrams of `normalise(text)` (`stillhouse.prompts.cleaning.words`), as ours.
- stillhouse, near-dup only: `PromptCleaner` with exact dedup off, `admit_batch` in batches of 1024.
- stillhouse, whole cleaner: `PromptCleaner` with the default filters (length, exact, near).

Each side runs in its own forked process, one after the other, so each peak RSS is its own; "dedup
memory" is that peak minus the process's RSS before it started (the prompts themselves). Rates are
prompts per CPU-second of that process (one core, single-threaded): on a shared machine, other work
stretches the wall clock but hardly the CPU time; wall seconds are printed beside them.
`run()` returns one dict per result row; `main()` prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil
from _table import print_grid, verdict
from datasketch import MinHash, MinHashLSH

from stillhouse.common.jobspec import PromptFilters
from stillhouse.prompts.cleaning import PromptCleaner, normalise, words

VOCABULARY_SIZE = 20_000
BATCH = 1024
MB = 1_000_000
FRESH, EXACT, NEAR = 0, 1, 2


@dataclass
class Corpus:
    texts: list[str]
    kind: np.ndarray  # FRESH, EXACT or NEAR per prompt


def synthetic_prompts(count: int, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocabulary = np.array(
        ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(VOCABULARY_SIZE)], dtype=object
    )
    weights = 1.0 / np.arange(1, VOCABULARY_SIZE + 1) ** 1.1
    weights /= weights.sum()
    kinds = rng.choice([FRESH, EXACT, NEAR], size=count, p=[0.7, 0.15, 0.15])
    kinds[:100] = FRESH
    lengths = np.clip(rng.lognormal(np.log(25), 0.6, count), 3, 300).astype(int)
    draws = iter(rng.choice(VOCABULARY_SIZE, size=int(lengths.sum()) + count, p=weights))
    texts: list[str] = []
    long_ones: list[int] = []
    for index in range(count):
        kind = kinds[index]
        if kind == FRESH:
            text = " ".join(vocabulary[next(draws)] for _ in range(lengths[index]))
            if lengths[index] >= 20:
                long_ones.append(index)
        elif kind == EXACT:
            original = texts[int(rng.integers(index))]
            text = ("  ".join(original.split()) if rng.random() < 0.5 else original.upper()) + " "
        else:
            tokens = texts[long_ones[int(rng.integers(len(long_ones)))]].split()
            for _ in range(max(1, len(tokens) // 25)):
                position = int(rng.integers(len(tokens)))
                edit = rng.integers(3)
                if edit == 0:
                    tokens[position] = str(vocabulary[next(draws)])
                elif edit == 1:
                    tokens.insert(position, str(vocabulary[next(draws)]))
                else:
                    del tokens[position]
            text = " ".join(tokens)
        texts.append(text)
    return Corpus(texts, kinds)


# --- the contenders ---------------------------------------------------------------------------------


def baseline(texts: list[str], threshold: float) -> np.ndarray:
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    removed = np.zeros(len(texts), dtype=bool)
    for index, text in enumerate(texts):
        tokens = words(normalise(text))
        shingles = [f"{a} {b}" for a, b in itertools.pairwise(tokens)] or tokens
        minhash = MinHash(num_perm=128)
        for shingle in shingles:
            minhash.update(shingle.encode())
        if lsh.query(minhash):
            removed[index] = True
        else:
            lsh.insert(index, minhash)
    return removed


def cleaner(filters: PromptFilters) -> Callable[[list[str], float], np.ndarray]:
    def clean(texts: list[str], threshold: float) -> np.ndarray:
        subject = PromptCleaner(filters)
        removed = np.zeros(len(texts), dtype=bool)
        for start in range(0, len(texts), BATCH):
            verdicts = subject.admit_batch(texts[start : start + BATCH])
            removed[start : start + len(verdicts)] = [verdict is not None for verdict in verdicts]
        return removed

    return clean


@dataclass
class Outcome:
    removed: np.ndarray
    seconds: float
    cpu_seconds: float
    peak_rss: int
    start_rss: int

    @property
    def memory(self) -> int:
        return self.peak_rss - self.start_rss


def _measure(side: Callable, texts: list[str], threshold: float, results) -> None:
    start_rss = psutil.Process().memory_info().rss
    started, cpu_started = time.perf_counter(), time.process_time()
    removed = side(texts, threshold)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.send(Outcome(removed, seconds, cpu_seconds, peak, start_rss))


def measure(side: Callable, texts: list[str], threshold: float) -> Outcome:
    """Run one side in a forked process (its own peak RSS) and bring back what it removed and its time."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_measure, args=(side, texts, threshold, send))
    process.start()
    outcome = receive.recv()
    process.join()
    return outcome


# --- the table -------------------------------------------------------------------------------------


def run(prompts: int = 100_000, baseline_prompts: int | None = None, threshold: float = 0.8) -> list[dict]:
    corpus = synthetic_prompts(prompts)
    compared = min(prompts, baseline_prompts or prompts)
    theirs = measure(baseline, corpus.texts[:compared], threshold)
    near_only = measure(
        cleaner(PromptFilters(dedup=False, nearDupThreshold=threshold, minChars=0)), corpus.texts, threshold
    )
    whole = measure(cleaner(PromptFilters(nearDupThreshold=threshold)), corpus.texts, threshold)

    def rate(outcome: Outcome, count: int) -> float:
        return count / outcome.cpu_seconds

    their_rate = rate(theirs, compared)
    rows = []
    for name, ours in (("near-dup only", near_only), ("whole cleaner (length, exact, near)", whole)):
        ratio = rate(ours, prompts) / their_rate
        rows.append(
            {
                "metric": f"prompts per CPU-second, {name}",
                "stillhouse": round(rate(ours, prompts)),
                "baseline": round(their_rate),
                "value": round(ratio, 2),
                "target": ">= 0.9x",
                "passed": ratio >= 0.9,
            }
        )
    kinds = corpus.kind[:compared]
    ours_removed = near_only.removed[:compared]
    labels = {EXACT: "injected exact copies", NEAR: "injected near-duplicates", FRESH: "fresh prompts"}
    for kind, label in labels.items():
        total = int((kinds == kind).sum())
        rows.append(
            {
                "metric": f"removed of {total} {label}",
                "stillhouse": int(ours_removed[kinds == kind].sum()),
                "baseline": int(theirs.removed[kinds == kind].sum()),
                "value": "",
                "target": "(context)",
                "passed": None,
            }
        )
    both = int((ours_removed & theirs.removed).sum())
    either = int((ours_removed | theirs.removed).sum())
    rows.append(
        {
            "metric": "removed by both / removed by either",
            "stillhouse": both,
            "baseline": either,
            "value": round(both / max(either, 1), 3),
            "target": "(context)",
            "passed": None,
        }
    )
    rows.append(
        {
            "metric": "peak RSS MB (dedup's own: peak - start), near-dup only",
            "stillhouse": f"{near_only.peak_rss / MB:.0f} ({near_only.memory / MB:.0f})",
            "baseline": f"{theirs.peak_rss / MB:.0f} ({theirs.memory / MB:.0f})",
            "value": "",
            "target": "(context)",
            "passed": None,
        }
    )
    for name, ours in (("near-dup only", near_only), ("whole cleaner", whole)):
        rows.append(
            {
                "metric": f"CPU s / wall s, {name}",
                "stillhouse": f"{ours.cpu_seconds:.1f} / {ours.seconds:.1f}",
                "baseline": f"{theirs.cpu_seconds:.1f} / {theirs.seconds:.1f}",
                "value": "",
                "target": "(context)",
                "passed": None,
            }
        )
    print(f"{prompts} prompts (baseline on the first {compared}), threshold {threshold}")
    return rows


def print_table(results: list[dict]) -> None:
    headers = ["metric", "stillhouse", "baseline", "ratio/value", "target", "pass"]
    rows = [
        [
            str(row["metric"]),
            str(row["stillhouse"]),
            str(row["baseline"]),
            str(row["value"]),
            str(row["target"]),
            verdict(row["passed"]),
        ]
        for row in results
    ]
    print_grid(headers, rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument(
        "--baseline-prompts", type=int, default=None, help="run the baseline on the first N prompts only"
    )
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args(argv)
    results = run(args.prompts, args.baseline_prompts, args.threshold)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
