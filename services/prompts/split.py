"""The held-out split: which prompts train the student and which evaluate it.

The split is drawn by group, so that a held-out prompt never shares its group with a training prompt
and the evaluation measures what the student learned beyond its training prompts, not how well it
recalls a sibling of a held-out prompt. A prompt's group key:

- a template prompt: the template and the value of its first slot (`template_group`). All prompts of
  one concept (say `{{ product }}` = "a kettle", whatever the other slots say) fall on one side, so a
  held-out concept is never seen in training;
- a source prompt whose row names a `group` (a field or column): that group (`source_group`), shared by
  the rows of every source that name it;
- any other prompt (a source row without a group, a generated prompt): its own id.

Membership is a pure function of the group key and the seed (`holdout_score` < fraction): the same
prompt lands on the same side in every run, whatever the order of the stream and whatever other prompts
it holds, so adding prompts never moves an existing one across the split.

`HoldoutSplitter` also keeps near-duplicates from straddling the split, in one streaming pass over
cleaned prompts. It indexes the MinHash signatures of the held-out prompts (the same signatures as
`PromptCleaner`, with an LSH banding tuned for even higher recall) and drops a training prompt that is a
near-duplicate of an earlier held-out one (`near_holdout`). The other order, a held-out prompt near an
earlier training prompt, needs an index of the training side, which is kept only when the prompts were
not cleaned of near-duplicates (`near_dup_threshold` None; the split then uses 0.8): such a held-out
prompt is dropped (`near_train`), since the training prompt has already gone out. When the prompts were
cleaned at threshold t, the cleaner already let no such pair through, and the split checks at t too.

Guarantee: no training prompt and held-out prompt whose MinHash signatures agree on at least the
threshold's share of permutations (the Jaccard estimate), among the pairs the LSH proposes. The banding
proposes a pair at the threshold with probability ~0.98 (0.8: 17 bands of 7), and above 0.998 from
0.05 over it; below the threshold nothing is dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from stillhouse.prompts.cleaning import MinHashSigner, NearDuplicateIndex, normalise

Side = Literal["train", "holdout", "dropped"]

DEFAULT_SPLIT_THRESHOLD = 0.8
SPLIT_LSH_WEIGHTS = (0.02, 0.98)
SPLIT_RULES = ("near_holdout", "near_train")


def holdout_score(group_key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the group key (a prompt id for a prompt of its own) and the
    seed."""
    digest = hashlib.blake2b(f"{seed}:{group_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_holdout(group_key: str, fraction: float, seed: int) -> bool:
    return holdout_score(group_key, seed) < fraction


def template_group(template: str, first_slot_value: str) -> str:
    """The group key of a prompt rendered from `template` with `first_slot_value` in its first slot."""
    template_hash = hashlib.blake2b(template.encode(), digest_size=8).hexdigest()
    return f"template:{template_hash}:{first_slot_value}"


def source_group(group: str) -> str:
    """The group key of a source row that names `group` (kept apart from prompt ids and templates)."""
    return f"group:{group}"


class HoldoutSplitter:
    """Assigns each cleaned prompt, in arrival order, to `train` or `holdout`, or drops it (see above).

    `near_dup_threshold` is the threshold the prompts were cleaned at (`filters.nearDupThreshold`), None
    when near-duplicate removal was off. `num_perm` and `seed` are the cleaner's MinHash parameters.
    """

    def __init__(
        self,
        fraction: float,
        seed: int,
        near_dup_threshold: float | None,
        *,
        num_perm: int = 128,
        minhash_seed: int = 1,
    ) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
        self.fraction = fraction
        self.seed = seed
        self.threshold = DEFAULT_SPLIT_THRESHOLD if near_dup_threshold is None else near_dup_threshold
        self._signer = MinHashSigner(num_perm, minhash_seed)

        def index() -> NearDuplicateIndex:
            return NearDuplicateIndex(self.threshold, num_perm, minhash_seed, lsh_weights=SPLIT_LSH_WEIGHTS)

        self._holdout_index = index()
        self._train_index = index() if near_dup_threshold is None else None
        self.train = 0
        self.holdout = 0
        self._dropped: Counter[str] = Counter()

    @property
    def dropped_by_rule(self) -> dict[str, int]:
        return {rule: self._dropped[rule] for rule in SPLIT_RULES}

    def assign(self, prompt_id: str, text: str, group_key: str | None = None) -> Side:
        return self.assign_batch([prompt_id], [text], [group_key])[0]

    def assign_batch(
        self,
        prompt_ids: Sequence[str],
        texts: Sequence[str],
        group_keys: Sequence[str | None] | None = None,
    ) -> list[Side]:
        """`assign` for each prompt in order; signatures are computed for the whole batch at once.
        `group_keys`: each prompt's group key (module docstring), None for a prompt of its own."""
        signatures = self._signer.signatures([normalise(text) for text in texts])
        keys = [
            group or prompt_id
            for prompt_id, group in zip(prompt_ids, group_keys or [None] * len(prompt_ids), strict=True)
        ]
        return self.assign_signed(keys, signatures)

    def assign_signed(self, keys: Sequence[str], signatures: np.ndarray) -> list[Side]:
        """`assign_batch` for prompts whose group keys (a prompt's id for one of its own) and MinHash
        signatures (the cleaner's, of the normalised text) are known already."""
        sides: list[Side] = []
        holdout_batch = self._holdout_index.batch(signatures)
        train_batch = self._train_index.batch(signatures) if self._train_index is not None else None
        for position, key in enumerate(keys):
            if is_holdout(key, self.fraction, self.seed):
                if train_batch is not None and train_batch.contains_near(position):
                    self._dropped["near_train"] += 1
                    sides.append("dropped")
                    continue
                holdout_batch.add(position)
                self.holdout += 1
                sides.append("holdout")
            else:
                if holdout_batch.contains_near(position):
                    self._dropped["near_holdout"] += 1
                    sides.append("dropped")
                    continue
                if train_batch is not None:
                    train_batch.add(position)
                self.train += 1
                sides.append("train")
        holdout_batch.commit()
        if train_batch is not None:
            train_batch.commit()
        return sides
