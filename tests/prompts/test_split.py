"""The held-out split: deterministic by group (a prompt's own id by default), the right size, no group and
no near-duplicate on both sides."""

from __future__ import annotations

import random

import pytest

from stillhouse.common.datasets.records import prompt_id
from stillhouse.prompts.cleaning import MinHashSigner, normalise
from stillhouse.prompts.split import (
    HoldoutSplitter,
    holdout_score,
    is_holdout,
    source_group,
    template_group,
)

WORDS = [f"w{i}" for i in range(400)]


def ids(count: int) -> list[str]:
    return [prompt_id([{"role": "user", "content": f"prompt {i}"}]) for i in range(count)]


def test_scores_are_deterministic_and_seeded():
    some = ids(100)
    assert [holdout_score(i, 3) for i in some] == [holdout_score(i, 3) for i in some]
    assert [holdout_score(i, 3) for i in some] != [holdout_score(i, 4) for i in some]
    assert all(0 <= holdout_score(i, 3) < 1 for i in some)


def test_fraction_is_roughly_right_on_10000_ids():
    held = sum(is_holdout(i, 0.1, seed=0) for i in ids(10_000))
    assert 880 <= held <= 1120  # binomial sd 30


def test_membership_ignores_order_and_other_prompts():
    some = ids(2000)
    shuffled = random.Random(0).sample(some, len(some))
    forward = {i for i in some if is_holdout(i, 0.2, seed=1)}
    assert forward == {i for i in shuffled if is_holdout(i, 0.2, seed=1)}
    more = some + ids(4000)[2000:]
    assert forward == {i for i in more if is_holdout(i, 0.2, seed=1)} & set(some)


def test_splitter_assignment_is_the_same_across_runs_and_orders():
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(25)) for _ in range(1500)]
    prompt_ids = [prompt_id([{"role": "user", "content": t}]) for t in texts]

    def sides(order: list[int]) -> dict[str, str]:
        splitter = HoldoutSplitter(0.1, seed=5, near_dup_threshold=0.8)
        assigned = splitter.assign_batch([prompt_ids[i] for i in order], [texts[i] for i in order])
        return {prompt_ids[i]: side for i, side in zip(order, assigned, strict=True)}

    forward = sides(list(range(1500)))
    assert forward == sides(list(range(1500)))
    assert forward == sides(random.Random(2).sample(range(1500), 1500))
    assert set(forward.values()) == {"train", "holdout"}  # distinct prompts: nothing dropped


def near_duplicate_stream(rng: random.Random, groups: int) -> list[str]:
    """Groups of prompts that each differ from their group's first prompt by one word (or are copies)."""
    texts = []
    for _ in range(groups):
        base = [rng.choice(WORDS) for _ in range(30)]
        texts.append(" ".join(base))
        for copy in range(rng.randrange(1, 5)):
            variant = list(base)
            variant[rng.randrange(30)] = f"edit{copy}"
            texts.append(" ".join(variant))
    return rng.sample(texts, len(texts))


def test_no_near_duplicate_straddles_the_split_when_cleaning_was_off():
    rng = random.Random(3)
    texts = near_duplicate_stream(rng, 300)
    prompt_ids = [prompt_id([{"role": "user", "content": t}]) for t in texts]
    splitter = HoldoutSplitter(0.3, seed=0, near_dup_threshold=None)
    sides = splitter.assign_batch(prompt_ids, texts)

    signer = MinHashSigner()
    signatures = signer.signatures([normalise(t) for t in texts])
    train = signatures[[side == "train" for side in sides]]
    holdout = signatures[[side == "holdout" for side in sides]]
    agreement = (train[:, None, :] == holdout[None, :, :]).mean(axis=2)
    assert agreement.max() < 0.8
    dropped = splitter.dropped_by_rule
    assert dropped["near_holdout"] > 0 and dropped["near_train"] > 0
    assert splitter.train + splitter.holdout + sum(dropped.values()) == len(texts)
    assert sides.count("dropped") == sum(dropped.values())


def test_train_prompt_near_a_holdout_prompt_is_dropped_after_cleaning():
    rng = random.Random(4)
    base = [rng.choice(WORDS) for _ in range(30)]
    held_text = " ".join(base)
    base[7] = "edited"
    near_text = " ".join(base)
    splitter = HoldoutSplitter(0.5, seed=0, near_dup_threshold=0.8)
    held_id = next(i for i in ids(50) if is_holdout(i, 0.5, 0))
    train_ids = [i for i in ids(50) if not is_holdout(i, 0.5, 0)]
    assert splitter.assign(held_id, held_text) == "holdout"
    assert splitter.assign(train_ids[0], near_text) == "dropped"
    assert splitter.assign(train_ids[1], " ".join(rng.choice(WORDS) for _ in range(30))) == "train"
    assert splitter.dropped_by_rule == {"near_holdout": 1, "near_train": 0}


def test_prompts_of_one_group_share_a_side_and_groups_spread_over_both():
    splitter = HoldoutSplitter(0.3, seed=2, near_dup_threshold=0.9)
    concepts = [f"concept{c}" for c in range(40)]
    prompts = [
        (concept, f"{verb} {concept} {WORDS[i]}") for i, concept in enumerate(concepts) for verb in "ABC"
    ]
    keys = [template_group("Tell me about {{ concept }} {{ x }}", concept) for concept, _ in prompts]
    texts = [text for _, text in prompts]
    sides = splitter.assign_batch([prompt_id([{"role": "user", "content": t}]) for t in texts], texts, keys)
    by_concept: dict[str, set[str]] = {}
    for (concept, _), side in zip(prompts, sides, strict=True):
        by_concept.setdefault(concept, set()).add(side)
    assert all(len(seen) == 1 for seen in by_concept.values()), by_concept  # no group crosses the split
    held = sum(seen == {"holdout"} for seen in by_concept.values())
    assert 4 <= held <= 20  # about 30% of 40 groups
    # The side is the group's: a prompt's own id plays no part once it has a group.
    assert all(is_holdout(keys[i], 0.3, seed=2) == (side == "holdout") for i, side in enumerate(sides))


def test_group_keys_keep_templates_sources_and_ids_apart():
    assert template_group("{{ a }} b", "x") == template_group("{{ a }} b", "x")
    assert template_group("{{ a }} b", "x") != template_group("{{ a }} c", "x")
    assert template_group("{{ a }} b", "x") != template_group("{{ a }} b", "y")
    assert source_group("x") == "group:x" and not template_group("t", "x").startswith("group:")
    # Without group keys, the split is by prompt id, as it always was.
    plain = HoldoutSplitter(0.5, seed=1, near_dup_threshold=0.9)
    some = ids(50)
    texts = [" ".join(WORDS[i * 5 : i * 5 + 5]) for i in range(50)]
    assert plain.assign_batch(some, texts) == ["holdout" if is_holdout(i, 0.5, 1) else "train" for i in some]


def test_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        HoldoutSplitter(1.0, seed=0, near_dup_threshold=None)
