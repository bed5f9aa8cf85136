"""LSH band tables in about 12 bytes per band per text: which texts added so far share a band with a
signature.

Texts are numbered 0, 1, 2, ... in the order they are added. Each band of a signature (`rows` values)
is reduced to one 64-bit hash, salted by its band number so that all bands share one table; two equal
bands always hash alike, and two different bands collide with probability about 2**-64, which only
proposes a candidate that the caller verifies anyway.

Recent additions sit in a dict; every `FLUSH_ENTRIES` of them move into a run of sorted numpy arrays
(hash, text number), and runs of similar size are merged, so that about log2(n / FLUSH_ENTRIES) runs
exist and a query is one binary search per run. A batch of texts can be queried (`candidate_pairs`) and
added (`add_many`, as a run of its own) at once, with numpy doing the work of a Python loop. A dict of
Python objects per band entry (as `datasketch.MinHashLSH` keeps) takes some 300 bytes per band per text
instead.
"""

from __future__ import annotations

import numpy as np

FLUSH_ENTRIES = 1 << 16
_SALT = np.uint64(0x9E3779B97F4A7C15)


class BandIndex:
    def __init__(self, bands: int, rows: int, seed: int = 0) -> None:
        if bands < 1 or rows < 1:
            raise ValueError(f"bands and rows must be >= 1, got {bands} and {rows}")
        self.bands = bands
        self.rows = rows
        # Odd 64-bit multipliers: a band's hash is a random linear form of its values (mod 2**64).
        rng = np.random.default_rng(seed)
        self._multipliers = rng.integers(1, 2**63, size=(bands, rows), dtype=np.uint64) * 2 + 1
        self._band_salts = np.arange(1, bands + 1, dtype=np.uint64) * _SALT
        self._recent: dict[int, list[int]] = {}
        self._recent_entries = 0
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, text numbers), big first

    def band_hashes(self, signature: np.ndarray) -> np.ndarray:
        """[bands] uint64: one hash per band of the signature's first bands * rows values."""
        values = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (values * self._multipliers).sum(axis=1, dtype=np.uint64) ^ self._band_salts

    def band_hashes_many(self, signatures: np.ndarray) -> np.ndarray:
        """[n, bands] uint64: the `band_hashes` of each of n signatures."""
        count = len(signatures)
        values = (
            signatures[:, : self.bands * self.rows].astype(np.uint64).reshape(count, self.bands, self.rows)
        )
        with np.errstate(over="ignore"):
            return (values * self._multipliers).sum(axis=2, dtype=np.uint64) ^ self._band_salts

    def candidate_pairs(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For [n, bands] band hashes of n queries: (query, text) pairs in which an added text shares a
        band hash with a query (pairs may repeat)."""
        # Searching sorted hashes visits each run in order, not at random: several times faster.
        order = np.argsort(hashes.ravel())
        flat = hashes.ravel()[order]
        queries = order // hashes.shape[1]
        found_queries: list[np.ndarray] = []
        found_texts: list[np.ndarray] = []
        for run_hashes, run_texts in self._runs:
            starts = np.searchsorted(run_hashes, flat, side="left")
            counts = np.searchsorted(run_hashes, flat, side="right") - starts
            hits = np.flatnonzero(counts)
            if not len(hits):
                continue
            hit_counts = counts[hits]
            offsets = np.arange(hit_counts.sum()) - np.repeat(np.cumsum(hit_counts) - hit_counts, hit_counts)
            found_queries.append(np.repeat(queries[hits], hit_counts))
            found_texts.append(run_texts[np.repeat(starts[hits], hit_counts) + offsets].astype(np.int64))
        if self._recent:
            recent = [
                (query, text)
                for query, value in zip(queries.tolist(), flat.tolist(), strict=True)
                for text in self._recent.get(value, ())
            ]
            if recent:
                pairs = np.asarray(recent, dtype=np.int64)
                found_queries.append(pairs[:, 0])
                found_texts.append(pairs[:, 1])
        if not found_queries:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(found_queries), np.concatenate(found_texts)

    def add_many(self, first_text: int, hashes: np.ndarray) -> None:
        """Add texts `first_text`, `first_text + 1`, ... with their [n, bands] band hashes."""
        if not len(hashes):
            return
        texts = np.repeat(np.arange(first_text, first_text + len(hashes), dtype=np.int32), hashes.shape[1])
        self._push_run(hashes.ravel(), texts)

    def candidates(self, hashes: np.ndarray) -> np.ndarray:
        """Numbers of the added texts that share at least one band hash with `hashes` (unsorted, may
        repeat)."""
        found: list[np.ndarray] = []
        for run_hashes, run_texts in self._runs:
            starts = np.searchsorted(run_hashes, hashes, side="left")
            ends = np.searchsorted(run_hashes, hashes, side="right")
            found.extend(run_texts[start:end] for start, end in zip(starts, ends, strict=True) if end > start)
        recent = [text for value in hashes.tolist() for text in self._recent.get(value, ())]
        if recent:
            found.append(np.asarray(recent, dtype=np.int64))
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def add(self, text: int, hashes: np.ndarray) -> None:
        for value in hashes.tolist():
            self._recent.setdefault(value, []).append(text)
        self._recent_entries += len(hashes)
        if self._recent_entries >= FLUSH_ENTRIES:
            self._flush()

    def _flush(self) -> None:
        hashes = np.fromiter(
            (value for value, texts in self._recent.items() for _ in texts),
            dtype=np.uint64,
            count=self._recent_entries,
        )
        texts = np.fromiter(
            (text for group in self._recent.values() for text in group),
            dtype=np.int32,
            count=self._recent_entries,
        )
        self._recent, self._recent_entries = {}, 0
        self._push_run(hashes, texts)

    def _push_run(self, hashes: np.ndarray, texts: np.ndarray) -> None:
        self._runs.append(_sorted_run(hashes, texts))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append(_merged_runs(older, newer))


Run = tuple[np.ndarray, np.ndarray]


def _sorted_run(hashes: np.ndarray, texts: np.ndarray) -> Run:
    order = np.argsort(hashes, kind="stable")
    return hashes[order], texts[order]


def _merged_runs(older: Run, newer: Run) -> Run:
    """Two sorted runs as one, placed by binary search rather than sorted again: the largest merge of a
    big index then needs little memory beyond its result."""
    size = len(older[0]) + len(newer[0])
    newer_places = np.searchsorted(older[0], newer[0], side="right") + np.arange(len(newer[0]))
    older_places = np.ones(size, dtype=bool)
    older_places[newer_places] = False
    merged: list[np.ndarray] = []
    for old, new in zip(older, newer, strict=True):
        out = np.empty(size, dtype=old.dtype)
        out[newer_places] = new
        out[older_places] = old
        merged.append(out)
    return merged[0], merged[1]
