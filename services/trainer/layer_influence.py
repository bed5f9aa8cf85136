"""Which decoder layers a depth-pruned student keeps, by each layer's influence on the teacher's
hidden states over calibration text (ShortGPT's Block Influence: Men et al. 2024).

A layer whose output is nearly its input (cosine similarity close to 1) changes little and is the
cheapest to drop; the first and the last layer are always kept (they map to and from the embedding
space, and removing either breaks the model). Measured on SmolLM2-135M-Instruct at 15 of 30 layers,
the untrained influence-chosen copy has held-out KL 3.0 nats/token against the teacher and top-1
agreement 0.24, where the evenly spread copy has KL 10.0 and 0.004 — the same training then ends at
KL 1.25 / top-1 0.50 instead of 1.90 / 0.37.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from stillhouse.trainer.calibration import CalibrationText, Total, run_recording, summed


def block_influence(layers: nn.ModuleList, run_model: Callable[[], None], total: Total = list) -> list[float]:
    """1 - mean cosine similarity between each layer's input and output hidden states over every position
    `run_model` (one or more forward passes of the model that owns `layers`) feeds through it, on every
    worker that `total` sums over."""
    totals = torch.zeros(len(layers), dtype=torch.float64)
    positions = torch.zeros(len(layers), dtype=torch.float64)

    def recorder(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            similarity = nn.functional.cosine_similarity(
                before.flatten(0, -2).float(), after.flatten(0, -2).float(), dim=-1
            )
            totals[index] += (1 - similarity).sum().double()
            positions[index] += similarity.numel()

        return record

    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    run_recording(run_model, handles)
    totals, positions = summed(total, totals, positions)
    if not positions.all():
        raise ValueError("no calibration position reached the decoder layers")
    return (totals / positions).tolist()


def check_layers_to_keep(count: int, keep: int) -> None:
    """ValueError, naming pruneTeacherDepth, unless a student can keep `keep` of `count` layers."""
    if not 0 < keep < count:
        raise ValueError(
            f"pruneTeacherDepth must be between 1 and {count - 1} (the teacher has {count} decoder layers); "
            f"got {keep}"
        )


def evenly_spread_layers(count: int, keep: int) -> list[int]:
    """The `keep` of `count` layers that layerSelection `spread` keeps: the first, the last and the others
    evenly spaced between them (how DistilBERT initialised its student, Sanh et al. 2019); one layer: the
    first."""
    check_layers_to_keep(count, keep)
    if keep == 1:
        return [0]
    # Spacing (count - 1) / (keep - 1) is more than 1, so the rounded positions are distinct.
    return [round(i * (count - 1) / (keep - 1)) for i in range(keep)]


def most_influential_layers(influence: Sequence[float], keep: int) -> list[int]:
    """The `keep` layers to keep, in order: the first and the last, then the most influential of the
    others (the lower index first among equals); one layer: the first."""
    count = len(influence)
    check_layers_to_keep(count, keep)
    if keep == 1:
        return [0]
    middle = sorted(range(1, count - 1), key=lambda index: (-influence[index], index))
    return sorted([0, count - 1, *middle[: keep - 2]])


@dataclass
class LayerChoice:
    """Chooses the layers of a depth-pruned student as `student_init.build_student` asks, and remembers
    them in `kept`. Selection `influence` (the default, when `selection` is None) ranks the layers on
    `calibration`, each worker on its share of it, summed over the workers by `total`, so that every worker
    keeps the same layers. Selection `spread` needs no data."""

    selection: str | None
    calibration: CalibrationText
    total: Total
    kept: list[int] | None = field(default=None, init=False)

    def __call__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, keep: int) -> list[int]:
        if self.selection == "spread":
            self.kept = evenly_spread_layers(len(model.model.layers), keep)
            return self.kept
        run_model = self.calibration.runner(model, tokenizer, "layerSelection `influence`")
        influence = block_influence(model.model.layers, run_model, self.total)
        self.kept = most_influential_layers(influence, keep)
        return self.kept
