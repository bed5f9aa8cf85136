"""The compact LSH band tables: the same candidates as a plain table of every band, whether the texts
sit among the recent additions or in sorted runs, merged or not."""

from __future__ import annotations

import numpy as np
import pytest

from stillhouse.prompts import band_index
from stillhouse.prompts.band_index import BandIndex

BANDS, ROWS = 4, 3


def reference_candidates(added: list[np.ndarray], signature: np.ndarray) -> set[int]:
    """Texts sharing at least one whole band with `signature`, by comparing every band."""
    bands = signature[: BANDS * ROWS].reshape(BANDS, ROWS)
    return {
        text
        for text, other in enumerate(added)
        if (other[: BANDS * ROWS].reshape(BANDS, ROWS) == bands).all(axis=1).any()
    }


@pytest.mark.parametrize("flush_entries", [1 << 16, 8, 1])
def test_candidates_are_exactly_the_texts_sharing_a_band(monkeypatch, flush_entries):
    monkeypatch.setattr(band_index, "FLUSH_ENTRIES", flush_entries)
    rng = np.random.default_rng(7)
    # Values from a small alphabet, so that bands repeat often, plus a tail the bands do not cover.
    signatures = [rng.integers(0, 3, BANDS * ROWS + 2, dtype=np.uint64) for _ in range(300)]
    index = BandIndex(BANDS, ROWS)
    added: list[np.ndarray] = []
    matched = 0
    for text, signature in enumerate(signatures):
        found = set(index.candidates(index.band_hashes(signature)).tolist())
        assert found == reference_candidates(added, signature), text
        matched += bool(found)
        index.add(text, index.band_hashes(signature))
        added.append(signature)
    assert 0 < matched < len(signatures)  # the data has texts with and without candidates


def test_the_same_values_in_different_bands_do_not_match():
    index = BandIndex(2, 2)
    index.add(0, index.band_hashes(np.array([1, 2, 3, 4], dtype=np.uint64)))
    swapped = np.array([3, 4, 1, 2], dtype=np.uint64)
    assert len(index.candidates(index.band_hashes(swapped))) == 0
    one_band_shared = np.array([1, 2, 9, 9], dtype=np.uint64)
    assert index.candidates(index.band_hashes(one_band_shared)).tolist() == [0]


def test_bands_and_rows_must_be_positive():
    with pytest.raises(ValueError, match="bands and rows"):
        BandIndex(0, 4)
