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


# The metrics a lead is told on, with their names in words and whether lower is better.
_LEAD_METRICS = (("kl", "KL", True), ("top1_agreement", "top-1 agreement", False))


def lead_sentence(leads: Mapping[str, Mapping[str, float]], other: str) -> str:
    """The student's lead over `other` in words, from its difference and 95% interval per metric (see
    `stillhouse.trainer.paired_lead`); "" when there is none."""
    parts = []
    for metric, label, lower_is_better in _LEAD_METRICS:
        lead = leads.get(metric)
        if not lead:
            continue
        below, above = lead["high"] < 0, lead["low"] > 0
        if below or above:
            verdict = "ahead" if below == lower_is_better else "behind"
        else:
            verdict = "no clear difference"
        parts.append(
            f"{label} {lead['difference']:+.3f} (95% interval {lead['low']:+.3f} to {lead['high']:+.3f}: "
            f"{verdict})"
        )
    if not parts:
        return ""
    return f"Against {other}, paired over the held-out answers: " + ", ".join(parts) + "."
