"""The evaluation's headline in words, for the report, the model card and the CLI alike.

The headline is the share of the gap from a context-free unigram to the teacher that the student closes
(see `stillhouse.trainer.evaluation.Headline`), given per metric in percent: `kl` and `top1_agreement`
when the student shares the teacher's vocabulary, else `token_f1`.
"""

from __future__ import annotations

from collections.abc import Mapping


def format_share(percent: float | None) -> str:
    return "an undefined share" if percent is None else f"{percent:.1f}%"


def gap_closed_sentence(gap_closed: Mapping[str, float | None]) -> str:
    """The headline as a sentence, from the share closed per metric (None or absent: undefined)."""

    def share(metric: str) -> str:
        return format_share(gap_closed.get(metric))

    opening = "The student closes {} of the gap from a context-free unigram to the teacher"
    if "kl" in gap_closed:
        sentence = opening.format(share("kl")) + " on held-out KL"
        if "top1_agreement" in gap_closed:
            sentence += f", {share('top1_agreement')} on top-1 agreement"
        return sentence + "."
    return (
        opening.format(share("token_f1"))
        + " on the token F1 of its greedy answers (KL and top-1 agreement are not defined here)."
    )
