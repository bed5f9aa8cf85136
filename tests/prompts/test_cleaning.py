"""Cleaning: normalisation, length and language rules, exact and near-duplicate removal, the report."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from stillhouse.common.jobspec import PromptFilters
from stillhouse.prompts import cleaning
from stillhouse.prompts.cleaning import (
    MinHashSigner,
    NearDuplicateIndex,
    PromptCleaner,
    normalise,
    shingle_hashes,
    words,
)

VOCABULARY = [
    f"{stem}{suffix}"
    for stem in ("lor", "ips", "dol", "sit", "amet", "cons", "adip", "elit")
    for suffix in ("a", "e", "um", "or", "is", "ant", "ibus", "orum", "etur", "ando")
]


def random_prompt(rng: random.Random, length: int = 30) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(length))


def with_word_changed(prompt: str, position: int, replacement: str = "zebra") -> str:
    tokens = prompt.split()
    tokens[position] = replacement
    return " ".join(tokens)


def cleaner(**filters) -> PromptCleaner:
    return PromptCleaner(PromptFilters(**filters))


def test_normalise():
    assert normalise("  What  is\tDNS?\n") == "what is dns"
    fullwidth_hello = "\uff28\uff45\uff4c\uff4c\uff4f"
    assert normalise(f"« {fullwidth_hello}, World! »") == "hello, world"
    assert normalise("STRASSE") == normalise("straße")
    assert normalise("...") == ""


def test_words_split_unspaced_scripts_into_characters():
    assert words("write a haiku, please") == ["write", "a", "haiku", "please"]
    assert words("日本語のテキスト") == ["日", "本", "語", "の", "テ", "キ", "ス", "ト"]
    assert words("?!") == ["?!"]


def test_signatures_equal_datasketch_minhash_of_the_same_shingles():
    texts = [normalise(t) for t in ["Explain how DNS works, step by step.", "hi", "…", "日本語のテキスト"]]
    signatures = MinHashSigner(num_perm=64, seed=9).signatures(texts)
    for text, signature in zip(texts, signatures, strict=True):
        reference = MinHash(num_perm=64, seed=9, scheme="affine32", hashfunc=int)
        for value in shingle_hashes(text):
            reference.update(value)
        assert np.array_equal(reference.hashvalues, signature)


def test_signatures_do_not_depend_on_the_batch():
    rng = random.Random(0)
    texts = [random_prompt(rng, rng.randrange(1, 40)) for _ in range(3000)]
    signer = MinHashSigner()
    together = signer.signatures(texts)
    one_by_one = np.stack([signer.signatures([text])[0] for text in texts[:50]])
    assert np.array_equal(together[:50], one_by_one)


def test_one_word_changed_in_a_30_word_prompt_is_a_near_duplicate():
    rng = random.Random(1)
    prompts = [random_prompt(rng) for _ in range(100)]
    edited = [with_word_changed(p, rng.randrange(1, 29), f"changed{i}") for i, p in enumerate(prompts)]
    subject = cleaner()
    assert subject.admit_batch(prompts) == [None] * 100
    verdicts = subject.admit_batch(edited)
    assert verdicts.count("near_duplicate") >= 97
    assert subject.kept == 100 + verdicts.count(None)


def test_distinct_prompts_and_template_siblings_are_kept():
    rng = random.Random(2)
    distinct = [random_prompt(rng) for _ in range(500)]
    prefix = (
        "You are reviewing a pull request. Read the diff below carefully and list every bug you find, "
        "with the line it is on:"
    )
    siblings = [f"{prefix} {random_prompt(rng, 12)}" for _ in range(200)]
    subject = cleaner()
    assert subject.admit_batch(distinct + siblings) == [None] * 700
    assert subject.kept == 700
    # The same siblings are near-duplicates at a lower threshold: the threshold decides.
    assert cleaner(nearDupThreshold=0.3).admit_batch(siblings).count("near_duplicate") > 150


def test_exact_duplicates_after_normalisation():
    subject = cleaner()
    verdicts = subject.admit_batch(
        ["What is DNS?", "what   is dns", "WHAT IS DNS?!", "What is DNS, exactly?", "What is DNS?"]
    )
    assert verdicts == [None, "exact_duplicate", "exact_duplicate", None, "exact_duplicate"]


def test_dedup_false_turns_exact_dedup_off_and_threshold_none_near_dup():
    texts = ["What is DNS?", "what is dns"]
    assert cleaner(dedup=False).admit_batch(texts) == [None, "near_duplicate"]
    assert cleaner(dedup=False, nearDupThreshold=None).admit_batch(texts) == [None, None]
    rng = random.Random(3)
    prompt = random_prompt(rng)
    assert cleaner(nearDupThreshold=None).admit_batch([prompt, with_word_changed(prompt, 5)]) == [None, None]


def test_length_rules_on_the_stripped_text():
    subject = cleaner(minChars=5, maxChars=20)
    assert subject.admit_batch(["  abc  ", "abcde", "x" * 21, "  " + "y" * 20 + "  "]) == [
        "too_short",
        None,
        "too_long",
        None,
    ]


def test_language_rule():
    subject = cleaner(languages=["en", "fr"])
    verdicts = subject.admit_batch(
        [
            "Please explain how a hash table handles collisions.",
            "Explique-moi comment fonctionne une table de hachage, s'il te plaît.",
            "Erkläre mir bitte, wie eine Hashtabelle mit Kollisionen umgeht.",
            "请解释一下哈希表是如何处理冲突的。",
        ]
    )
    assert verdicts == [None, None, "language", "language"]


def test_rules_apply_in_order_and_the_report_counts_them():
    rng = random.Random(4)
    base = random_prompt(rng)
    subject = cleaner(minChars=10, maxChars=400, languages=["en"])
    verdicts = subject.admit_batch(
        [
            "short",  # too_short, even though it is also not English
            "Please summarise the following meeting notes in three bullet points for the team.",
            "please summarise the following meeting notes in three bullet points for the team",
            "Bitte fasse die folgenden Besprechungsnotizen in drei Stichpunkten zusammen.",
            "x " * 300,
        ]
    )
    assert verdicts == ["too_short", None, "exact_duplicate", "language", "too_long"]
    assert subject.kept == 1
    assert subject.removed_by_rule == {
        "too_short": 1,
        "too_long": 1,
        "language": 1,
        "exact_duplicate": 1,
        "near_duplicate": 0,
    }
    plain = cleaner()
    for text in [base, with_word_changed(base, 3), base.upper(), random_prompt(rng)]:
        plain.admit(text)
    assert plain.kept == 2
    assert plain.removed_by_rule["near_duplicate"] == 1 and plain.removed_by_rule["exact_duplicate"] == 1


def test_first_occurrence_wins_within_a_batch():
    rng = random.Random(5)
    base = random_prompt(rng)
    variants = [with_word_changed(base, 10, f"other{i}") for i in range(3)]
    assert cleaner().admit_batch([*variants, base]) == [
        None,
        "near_duplicate",
        "near_duplicate",
        "near_duplicate",
    ]


def test_verdicts_do_not_depend_on_how_the_index_stores_signatures(monkeypatch):
    rng = random.Random(12)
    prompts = [random_prompt(rng) for _ in range(300)]
    prompts += [with_word_changed(prompt, 3, "changed") for prompt in prompts[::7]]
    expected = cleaner().admit_batch(prompts)
    monkeypatch.setattr(cleaning, "LOW_BITS_BLOCK", 7)  # many blocks, batches that straddle them
    subject = cleaner()
    in_batches = [
        verdict
        for start in range(0, len(prompts), 50)
        for verdict in subject.admit_batch(prompts[start : start + 50])
    ]
    assert in_batches == expected
    assert expected.count("near_duplicate") > 30


def test_verdicts_do_not_depend_on_the_batches():
    """A batch searches the index as it was before the batch at once, and its own prompts one by one:
    the same verdicts as prompts admitted one at a time, across the index's flushed runs too."""
    rng = random.Random(11)
    prompts: list[str] = []
    for index in range(6000):
        if prompts and index % 5 == 0:
            prompts.append(with_word_changed(rng.choice(prompts), rng.randrange(30), f"w{index}"))
        else:
            prompts.append(random_prompt(rng))
    one_by_one = cleaner()
    singly = [one_by_one.admit(text) for text in prompts[:1500]]
    singly += one_by_one.admit_batch(prompts[1500:])
    batched = cleaner()
    in_batches = [
        verdict
        for start in range(0, 6000, 700)
        for verdict in batched.admit_batch(prompts[start : start + 700])
    ]
    assert in_batches == singly
    assert 900 < singly.count("near_duplicate") <= 1200


def test_near_duplicate_of_kept_does_not_add():
    rng = random.Random(6)
    kept, fresh = random_prompt(rng), random_prompt(rng)
    subject = cleaner()
    subject.admit(kept)
    assert subject.near_duplicate_of_kept(with_word_changed(kept, 4))
    assert not subject.near_duplicate_of_kept(fresh)
    assert not subject.near_duplicate_of_kept(fresh)  # asking twice did not add it
    assert subject.admit(fresh) is None
    assert not cleaner(nearDupThreshold=None).near_duplicate_of_kept(kept)


def test_index_verifies_candidates_against_the_threshold():
    signer = MinHashSigner()
    rng = random.Random(7)
    base = random_prompt(rng, 40)
    # Ten of 39 bigrams changed: a Jaccard similarity near 0.6, under 0.8 but above 0.5.
    tokens = base.split()
    for position in range(0, 40, 8):
        tokens[position] = f"new{position}"
    other = " ".join(tokens)
    base_signature, other_signature = signer.signatures([base, other])
    strict, loose = NearDuplicateIndex(0.8), NearDuplicateIndex(0.5)
    for index in (strict, loose):
        index.add(base_signature)
    assert not strict.contains_near(other_signature)
    assert loose.contains_near(other_signature)
    assert len(strict) == 1


def test_index_rejects_a_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(0.0)
