"""Prompt cleaning: length and language filters, exact and near-duplicate removal, streaming.

Text is compared in its normalised form (`normalise`): Unicode NFKC, case-folded, runs of whitespace
collapsed to one space, punctuation and symbols stripped at both ends ("What is DNS?" and "what is dns"
are the same prompt).

Near-duplicates are found with MinHash over word bigrams of the normalised text. Words are runs of letters
and digits; characters of scripts written without spaces (Chinese, Japanese, Thai, ...) count as one word
each, so those languages get shingles too. A text with one word is its own single shingle, and a text with
no word at all (only punctuation) is shingled as its whole normalised form. Bigrams, not trigrams: prompts
are short, and one word changed in a 30-word prompt leaves a bigram Jaccard of ~0.87 (trigrams: ~0.81,
a coin flip at the default 0.8), while prompts from one template that differ in their slot values stay
well apart.

Signatures are computed in batches with numpy and are the same values as datasketch's `MinHash`
(scheme `affine32`, same seed and permutations) updated with `shingle_hashes`. LSH bands chosen by
datasketch's `MinHashLSH`, tuned for recall, propose candidates (kept in a compact `BandIndex`), and a
text is a near-duplicate only when its signature agrees with a candidate's on at least `threshold` of
the permutations (the MinHash estimate of their Jaccard similarity), so the threshold means what it says
instead of depending on the LSH banding alone.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import py3langid
from datasketch import MinHash, MinHashLSH

from stillhouse.common.jobspec import PromptFilters
from stillhouse.prompts.band_index import BandIndex

# Scripts written without spaces between words: each character is a word of its own.
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+")
_WHITESPACE = re.compile(r"\s+")

# LSH banding weights (false positive, false negative): every candidate is verified against its signature,
# so a false positive costs one comparison while a false negative is a duplicate let through.
LSH_WEIGHTS = (0.1, 0.9)
# Texts per numpy signature batch: small, so that the (shingles x num_perm) work arrays (about 1 MB)
# stay in the CPU's cache; 64 texts sign three times faster than 1024 (measured on 20,000 prompts).
SIGNATURE_BATCH_TEXTS = 64

# Signatures (their low 16 bits) per block of a near-duplicate index: 16 MiB at 128 permutations.
LOW_BITS_BLOCK = 1 << 16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)

RULES = ("too_short", "too_long", "language", "exact_duplicate", "near_duplicate")


def normalise(text: str) -> str:
    """The form prompts are compared in: NFKC, case-folded, whitespace collapsed, punctuation and
    symbols stripped at both ends."""
    folded = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    start, end = 0, len(folded)
    while start < end and _is_edge_noise(folded[start]):
        start += 1
    while end > start and _is_edge_noise(folded[end - 1]):
        end -= 1
    return folded[start:end]


def _is_edge_noise(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in "PS"


def words(normalised: str) -> list[str]:
    """The words shingles are made of (see the module docstring)."""
    return _WORD.findall(normalised) or [normalised]


def _finalizer(
    width: type[np.unsignedinteger], shifts: tuple[int, int, int], multipliers: tuple[int, int]
) -> Callable[[np.ndarray], np.ndarray]:
    """A MurmurHash3 finalizer: xor-shift, multiply, xor-shift, multiply, xor-shift, in `width` bits."""
    first, second, third = (width(shift) for shift in shifts)
    times_first, times_second = (width(multiplier) for multiplier in multipliers)

    def fmix(values: np.ndarray) -> np.ndarray:
        values = values ^ (values >> first)
        values = values * times_first
        values = values ^ (values >> second)
        values = values * times_second
        return values ^ (values >> third)

    return fmix


_fmix64 = _finalizer(np.uint64, (33, 33, 33), (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53))
# The 32-bit one is what datasketch's affine32 scheme applies to every input hash.
_fmix32 = _finalizer(np.uint32, (16, 13, 16), (0x85EBCA6B, 0xC2B2AE35))


def _shingle_hashes_of(word_lists: Sequence[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word bigrams of every text (its single word if it has one), concatenated,
    and the offset where each text's hashes start."""
    lengths = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(word_lists))
    word_hashes = np.fromiter(
        (zlib.crc32(word.encode()) for text_words in word_lists for word in text_words),
        dtype=np.uint64,
        count=int(lengths.sum()),
    )
    ends = np.cumsum(lengths)
    starts = ends - lengths
    following = np.zeros_like(word_hashes)
    following[:-1] = word_hashes[1:]
    last = np.zeros(len(word_hashes), dtype=bool)
    last[ends - 1] = True
    combined = np.where(last, word_hashes, word_hashes * _GOLDEN + following)
    keep = ~last
    keep[starts[lengths == 1]] = True
    hashes = (_fmix64(combined[keep]) >> np.uint64(32)).astype(np.uint32)
    counts = np.maximum(lengths - 1, 1)
    return hashes, np.cumsum(counts) - counts


def shingle_hashes(normalised: str) -> np.ndarray:
    """The 32-bit shingle hashes of one normalised text (what its MinHash is made of)."""
    hashes, _ = _shingle_hashes_of([words(normalised)])
    return hashes


class MinHashSigner:
    """Vectorised MinHash signatures, equal to datasketch `MinHash(num_perm, seed, scheme="affine32")`
    updated with each text's `shingle_hashes`."""

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        self.num_perm = num_perm
        self.seed = seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations

    def signatures(self, normalised_texts: Sequence[str]) -> np.ndarray:
        """One uint32 row of `num_perm` values per text."""
        out = np.empty((len(normalised_texts), self.num_perm), dtype=np.uint32)
        multipliers, offsets = self.permutations
        for start in range(0, len(normalised_texts), SIGNATURE_BATCH_TEXTS):
            batch = normalised_texts[start : start + SIGNATURE_BATCH_TEXTS]
            hashes, first = _shingle_hashes_of([words(text) for text in batch])
            permuted = _fmix32(hashes)[:, None] * multipliers + offsets
            out[start : start + len(batch)] = np.minimum.reduceat(permuted, first, axis=0)
        return out


class NearDuplicateIndex:
    """MinHash signatures of the texts added so far, and the question "is this one near any of them?".

    datasketch's `MinHashLSH` chooses the banding (bands x rows) for the threshold and weights; a
    `BandIndex` keeps the bands compactly, and the signatures themselves are kept as their low 16 bits
    (two values agree by chance with probability 2**-16, far below the estimator's own noise) to verify
    candidates.
    """

    def __init__(
        self,
        threshold: float,
        num_perm: int = 128,
        seed: int = 1,
        *,
        lsh_weights: tuple[float, float] = LSH_WEIGHTS,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        banding = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=lsh_weights)
        self._bands = BandIndex(banding.b, banding.r, seed)
        # Blocks of LOW_BITS_BLOCK signatures: growing never copies what is stored.
        self._low_bits: list[np.ndarray] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def contains_near(self, signature: np.ndarray) -> bool:
        """Whether an added signature agrees with this one on at least `threshold` of its values."""
        candidates = self._bands.candidates(self._bands.band_hashes(signature))
        if not len(candidates):
            return False
        stored = self._stored(np.unique(candidates))
        agreement = np.count_nonzero(stored == signature.astype(np.uint16), axis=1) / self.num_perm
        return bool(agreement.max() >= self.threshold)

    def add(self, signature: np.ndarray) -> None:
        self._store_low_bits(signature.astype(np.uint16)[None, :])
        self._bands.add(self._size, self._bands.band_hashes(signature))
        self._size += 1

    def batch(self, signatures: np.ndarray) -> NearDuplicateBatch:
        """`contains_near` and `add` for a batch of signatures taken in order, at numpy speed."""
        return NearDuplicateBatch(self, signatures)

    def near_added(self, low_bits: np.ndarray, band_hashes: np.ndarray) -> np.ndarray:
        """For each of n signatures (their low 16 bits and band hashes): whether an added signature
        agrees with it on at least `threshold` of its values."""
        near = np.zeros(len(low_bits), dtype=bool)
        queries, texts = self._bands.candidate_pairs(band_hashes)
        if len(queries):
            agreement = np.count_nonzero(self._stored(texts) == low_bits[queries], axis=1) / self.num_perm
            near[queries[agreement >= self.threshold]] = True
        return near

    def add_many(self, low_bits: np.ndarray, band_hashes: np.ndarray) -> None:
        self._store_low_bits(low_bits)
        self._bands.add_many(self._size, band_hashes)
        self._size += len(low_bits)

    def band_hashes_many(self, signatures: np.ndarray) -> np.ndarray:
        return self._bands.band_hashes_many(signatures)

    def _store_low_bits(self, low_bits: np.ndarray) -> None:
        """Store rows `_size`, `_size + 1`, ... (the caller then counts them)."""
        written = 0
        while written < len(low_bits):
            block, row = divmod(self._size + written, LOW_BITS_BLOCK)
            if block == len(self._low_bits):
                self._low_bits.append(np.empty((LOW_BITS_BLOCK, self.num_perm), dtype=np.uint16))
            part = low_bits[written : written + LOW_BITS_BLOCK - row]
            self._low_bits[block][row : row + len(part)] = part
            written += len(part)

    def _stored(self, texts: np.ndarray) -> np.ndarray:
        """The stored low bits of these texts, in their order."""
        stored = np.empty((len(texts), self.num_perm), dtype=np.uint16)
        blocks, rows = np.divmod(texts, LOW_BITS_BLOCK)
        for block in np.unique(blocks).tolist():
            chosen = blocks == block
            stored[chosen] = self._low_bits[block][rows[chosen]]
        return stored


class NearDuplicateBatch:
    """A batch of signatures checked and added in order, as one `contains_near` and `add` after another
    would: the index as it was before the batch is searched for all of them at once, and only the
    batch's own additions are looked up one by one; `commit` adds those to the index."""

    def __init__(self, index: NearDuplicateIndex, signatures: np.ndarray) -> None:
        self._index = index
        self._low_bits = signatures.astype(np.uint16)
        self._band_hashes = index.band_hashes_many(signatures)
        # Only the band hashes that another signature of the batch shares can propose a candidate here.
        _, inverse, counts = np.unique(self._band_hashes, return_inverse=True, return_counts=True)
        shared = (counts[inverse.reshape(-1)] > 1).reshape(self._band_hashes.shape)
        self._shared_hashes: dict[int, list[int]] = {
            int(row): self._band_hashes[row][shared[row]].tolist()
            for row in np.flatnonzero(shared.any(axis=1))
        }
        self._near_before = index.near_added(self._low_bits, self._band_hashes)
        self._added_by_hash: dict[int, list[int]] = {}
        self._added: list[int] = []

    def contains_near(self, position: int) -> bool:
        if self._near_before[position]:
            return True
        candidates = {
            other
            for value in self._shared_hashes.get(position, ())
            for other in self._added_by_hash.get(value, ())
        }
        if not candidates:
            return False
        stored = self._low_bits[sorted(candidates)]
        agreement = np.count_nonzero(stored == self._low_bits[position], axis=1) / self._index.num_perm
        return bool(agreement.max() >= self._index.threshold)

    def add(self, position: int) -> None:
        for value in self._shared_hashes.get(position, ()):
            self._added_by_hash.setdefault(value, []).append(position)
        self._added.append(position)

    def commit(self) -> None:
        self._index.add_many(self._low_bits[self._added], self._band_hashes[self._added])


@dataclass(frozen=True)
class PreparedPrompts:
    """What deduplication needs of a batch of prompts, each computed from its own text alone (so that
    shards of a stage can compute it apart): the length or language rule that removed each text (None
    for a survivor), and for the survivors, in order, the 8-byte hash of their normalised form and their
    MinHash signature."""

    rules: list[str | None]
    digests: np.ndarray  # [survivors] uint64
    signatures: np.ndarray  # [survivors, num_perm] uint32

    @property
    def survivors(self) -> list[int]:
        return [position for position, rule in enumerate(self.rules) if rule is None]


def exact_digest(normalised: str) -> int:
    """The 8-byte hash exact duplicates are told by."""
    return int.from_bytes(hashlib.blake2b(normalised.encode(), digest_size=8).digest(), "little")


class PromptCleaner:
    """Decides, text by text in arrival order, which prompts to keep.

    Rules run in this order: length (`too_short`, `too_long`, on the text with surrounding whitespace
    removed), `language`, `exact_duplicate`, `near_duplicate`. The first occurrence wins: a text is an exact
    duplicate of any earlier text that passed the length and language rules, and a near-duplicate of a
    text kept earlier. Memory grows only with what deduplication must remember: an 8-byte hash per distinct
    text, and the near-duplicate index of the kept ones.

    The work splits in two: `prepare` judges each text on its own (length, language, hash, signature) and
    may run anywhere; `admit_prepared` is the part that depends on the order (duplicates of earlier texts).
    `admit_batch` does both.
    """

    def __init__(self, filters: PromptFilters, *, num_perm: int = 128, seed: int = 1) -> None:
        self.filters = filters
        self._languages = set(filters.languages)
        self._seen_hashes: set[int] | None = set() if filters.dedup else None
        self.signer = MinHashSigner(num_perm, seed)
        self._near_index = (
            NearDuplicateIndex(filters.near_dup_threshold, num_perm, seed)
            if filters.near_dup_threshold is not None
            else None
        )
        self._removed: Counter[str] = Counter()
        self.kept = 0

    @property
    def removed_by_rule(self) -> dict[str, int]:
        """Texts removed so far, by rule (every rule listed, zeros included)."""
        return {rule: self._removed[rule] for rule in RULES}

    def admit(self, text: str) -> str | None:
        """None when `text` is kept, else the name of the rule that removed it."""
        return self.admit_batch([text])[0]

    def admit_batch(self, texts: Sequence[str]) -> list[str | None]:
        """`admit` for each text in order; signatures are computed for the whole batch at once."""
        prepared = self.prepare(texts)
        verdicts = list(prepared.rules)
        survivors = prepared.survivors
        for position, verdict in zip(
            survivors, self.admit_prepared(prepared.digests, prepared.signatures), strict=True
        ):
            verdicts[position] = verdict
        self._removed.update(rule for rule in prepared.rules if rule is not None)
        return verdicts

    def prepare(self, texts: Sequence[str]) -> PreparedPrompts:
        """Each text judged on its own (see `PreparedPrompts`); counts nothing."""
        rules = [self._length_or_language_rule(text) for text in texts]
        normalised = [normalise(text) for text, rule in zip(texts, rules, strict=True) if rule is None]
        digests = np.fromiter(map(exact_digest, normalised), dtype=np.uint64, count=len(normalised))
        return PreparedPrompts(rules, digests, self.signer.signatures(normalised))

    def admit_prepared(self, digests: np.ndarray, signatures: np.ndarray) -> list[str | None]:
        """The duplicate rules for prepared survivors in arrival order: None for each one kept, else
        `exact_duplicate` or `near_duplicate`. Counts what it keeps and removes."""
        verdicts: list[str | None] = [None] * len(digests)
        if self._seen_hashes is not None:
            seen = self._seen_hashes
            for position, digest in enumerate(digests.tolist()):
                if digest in seen:
                    verdicts[position] = "exact_duplicate"
                else:
                    seen.add(digest)
        if self._near_index is not None:
            distinct = [position for position, verdict in enumerate(verdicts) if verdict is None]
            batch = self._near_index.batch(signatures[distinct])
            for order, position in enumerate(distinct):
                if batch.contains_near(order):
                    verdicts[position] = "near_duplicate"
                else:
                    batch.add(order)
            batch.commit()
        self.kept += sum(verdict is None for verdict in verdicts)
        self._removed.update(verdict for verdict in verdicts if verdict is not None)
        return verdicts

    def count_removed(self, counts: Mapping[str, int]) -> None:
        """Count texts removed elsewhere (`prepare` in a shard, a shard's own deduplication)."""
        self._removed.update(counts)

    def near_duplicate_of_kept(self, text: str) -> bool:
        """Whether `text` is a near-duplicate of a kept text, without adding it (False when near-duplicate
        removal is off)."""
        if self._near_index is None:
            return False
        return self._near_index.contains_near(self.signer.signatures([normalise(text)])[0])

    def _length_or_language_rule(self, text: str) -> str | None:
        length = len(text.strip())
        if length < self.filters.min_chars:
            return "too_short"
        if length > self.filters.max_chars:
            return "too_long"
        if self._languages and py3langid.classify(text)[0] not in self._languages:
            return "language"
        return None
