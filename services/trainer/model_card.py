"""The student's model card: the README.md of a Hugging Face model folder, with YAML front matter.

It states what the student was distilled from (the teacher), on what (the data), how (the loss and the
training settings), what training measured, and, once the student has been evaluated, how it compares
with the teacher and with its own untrained baseline, with the definition of the headline figure.

`data` is free-form so that the training loop can pass whatever it counted; these keys get labels
(any other key is shown under its own name):

- ``dataset``: the id of the teacher's answers dataset the student was trained on;
- ``rows``, ``tokens``: answers and response tokens trained on; ``holdout_rows``: held-out prompts;
- ``student_init``: how the student was initialised; ``base_model``: the pretrained model it started
  from (front matter ``base_model``; the teacher's model when absent); ``teacher_layers_kept``: the
  teacher's decoder layers a depth-pruned student started from;
- ``steps``, ``epochs``, ``precision``, ``seconds``, ``gpu_hours``, ``final_loss``: training figures.

`evaluation` is what `stillhouse.trainer.evaluation` measured: ``metrics`` (per model and reference
row: uniform, unigram, baseline, control-sft, student, teacher), ``recovery`` (the headline: ``sentence``
and ``definition`` of the share of the unigram-to-teacher gap the student closes), ``leads`` (the
student's lead over each control, with its interval), ``holdout_rows`` and ``notes``.

The front matter also keeps the training settings and `data` under ``stillhouse:``, so that the card of
a trained student can be written again with its evaluation figures (`card_settings`) without the job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from stillhouse.common.jobspec import LossKind, TeacherSpec, TrainingSpec
from stillhouse.trainer.report import (
    MODEL_LABELS,
    control_lead_sentence,
    flat_items,
    metric_rows,
    models_in,
    shown,
)

_DATA_LABELS = {
    "dataset": "Teacher answers dataset",
    "rows": "Answers trained on",
    "tokens": "Response tokens trained on",
    "holdout_rows": "Held-out prompts (evaluation)",
    "student_init": "Student initialisation",
    "base_model": "Initial weights",
    "teacher_layers_kept": "Teacher layers kept",
    "steps": "Optimizer steps",
    "epochs": "Epochs",
    "precision": "Precision",
    "seconds": "Training time (s)",
    "gpu_hours": "GPU hours",
    "final_loss": "Final training loss",
}

_USAGE = """\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
chat = [{"role": "user", "content": "Hello!"}]
inputs = tokenizer.apply_chat_template(
    chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))
```"""


def model_card(
    teacher: TeacherSpec,
    training: TrainingSpec,
    data: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None,
) -> str:
    """The model card as Markdown with YAML front matter (Hugging Face model-card style)."""
    data_items, figures = _split_data(data)
    sections = [
        _title(teacher, evaluation),
        _table("Teacher", _teacher_items(teacher)),
        _table("Data", data_items),
        _table("Loss", _loss_items(training, teacher, data)),
        _table("Training", _training_items(training) + figures),
    ]
    metadata = _front_matter(teacher, training, data)
    if evaluation is not None:
        sections.append(evaluation_section(evaluation))
        metadata["model-index"] = _model_index(evaluation.get("metrics", {}).get("student", {}))
    sections.append(f"## How to use\n\n{_USAGE}")
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front_matter}---\n\n" + "\n\n".join(sections) + "\n"


_DATA_KEYS = frozenset(
    ("dataset", "rows", "tokens", "holdout_rows", "student_init", "base_model", "teacher_layers_kept")
)
_LOSS_KEYS = frozenset(("loss_fallback",))


def _split_data(data: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(what the student learned from, training figures): the entries of `data`, labelled (those the
    Loss section shows excepted)."""
    data_items, figures = [], []
    for key, value in flat_items({key: value for key, value in data.items() if key not in _LOSS_KEYS}):
        labelled = (_DATA_LABELS.get(key, key), value)
        (data_items if key.split(".")[0] in _DATA_KEYS else figures).append(labelled)
    return data_items, figures


def _front_matter(teacher: TeacherSpec, training: TrainingSpec, data: Mapping[str, Any]) -> dict[str, Any]:
    """The card's YAML front matter, but for the evaluation's `model-index`."""
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": str(data.get("base_model") or teacher.model),
        "tags": [
            "distillation",
            "knowledge-distillation",
            training.loss.kind.value.replace("_", "-"),
            "stillhouse",
        ],
    }
    if data.get("dataset"):
        metadata["datasets"] = [str(data["dataset"])]
    # What the card was written from, so that it can be written again with the evaluation figures
    # (`card_settings`). Through JSON first: YAML's safe dumper refuses numpy numbers and paths.
    metadata["stillhouse"] = {
        "training": training.model_dump(mode="json", by_alias=True),
        "data": json.loads(json.dumps(dict(data), default=str)),
    }
    return metadata


def _model_index(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The front matter's `model-index`: the student's evaluation figures, as the Hub shows them."""
    return [
        {
            "name": "student",
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Agreement with the teacher"},
                    "dataset": {"type": "held-out teacher answers", "name": "held-out prompts"},
                    "metrics": [
                        {"type": key, "value": round(float(value), 6)} for key, value in metrics.items()
                    ],
                }
            ],
        }
    ]


def _title(teacher: TeacherSpec, evaluation: Mapping[str, Any] | None) -> str:
    lines = [
        f"# A student distilled from `{teacher.model}`",
        "",
        f"This model was distilled by Stillhouse from the teacher `{teacher.model}`: trained to behave as "
        "the teacher does, on the teacher's own answers to the job's prompts.",
    ]
    if evaluation is not None:
        recovery = evaluation["recovery"]
        lines += [
            "",
            f"**{recovery['sentence']}** Gap closed: {recovery['definition']}",
        ]
    return "\n".join(lines)


def _table(title: str, items: list[tuple[str, Any]]) -> str:
    if not items:
        return f"## {title}\n\nNot recorded."
    rows = "\n".join(f"| {label} | `{shown(value)}` |" for label, value in items)
    return f"## {title}\n\n| | |\n|---|---|\n{rows}"


def _teacher_items(teacher: TeacherSpec) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("Backend", teacher.backend.value), ("Model", teacher.model)]
    if teacher.base_url:
        items.append(("API", teacher.base_url))
    items += [
        ("Revision", teacher.revision or "not pinned"),
        ("Sampling temperature", teacher.sampling.temperature),
        ("Max tokens per answer", teacher.sampling.max_tokens),
        ("Top-k logprobs per token", teacher.top_logprobs),
    ]
    return items


def _loss_items(
    training: TrainingSpec, teacher: TeacherSpec, data: Mapping[str, Any]
) -> list[tuple[str, Any]]:
    loss = training.loss
    items: list[tuple[str, Any]] = [("Kind", loss.kind.value)]
    if loss.kind is LossKind.SFT:
        items.append(("Teacher signal", "the teacher's response text (sequence-level distillation)"))
    else:
        source = (
            f"stored top-{teacher.top_logprobs} logprobs and the mass outside them"
            if loss.teacher_logits == "stored"
            else "full logits of the local teacher, computed during training"
        )
        items += [("Teacher signal", source), ("Temperature", loss.temperature), ("ceWeight", loss.ce_weight)]
        if loss.kind is LossKind.JSD:
            items.append(("beta", loss.beta))
    if loss.unlikelihood_weight > 0:
        items.append(("unlikelihoodWeight", loss.unlikelihood_weight))
    items.append(("fallbackToSft", loss.fallback_to_sft))
    if data.get("loss_fallback"):
        items.append(("Loss used", data["loss_fallback"]))
    return items


def _training_items(training: TrainingSpec) -> list[tuple[str, Any]]:
    on_policy = training.on_policy
    on_policy_items = (
        [
            ("On-policy share of steps", on_policy.fraction),
            ("On-policy generation length", on_policy.max_new_tokens),
            ("On-policy sampling temperature", on_policy.temperature),
        ]
        if on_policy is not None
        else []
    )
    return [
        ("Epochs (spec)", training.epochs),
        ("Learning rate", training.learning_rate),
        ("Tokens per optimizer step", training.batch_tokens),
        ("Max sequence length", training.max_seq_len),
        ("Warmup ratio", training.warmup_ratio),
        ("Workers", training.workers),
        ("CPUs per worker", training.cpus_per_worker),
        ("GPUs per worker", training.gpus_per_worker),
        ("Strategy", training.strategy.value),
        ("Seed", training.seed),
        *on_policy_items,
    ]


def evaluation_section(evaluation: Mapping[str, Any]) -> str:
    """The card's "Evaluation" section: the figures of every evaluated model and reference, and the notes."""
    metrics = evaluation.get("metrics", {})
    models = models_in(metrics)
    header = "| Metric | " + " | ".join(MODEL_LABELS[model] for model in models) + " |"
    divider = "|---|" + "---:|" * len(models)
    rows = [
        f"| {row.label} ({row.better} is better) | " + " | ".join(row.cells) + " |"
        for row in metric_rows(metrics)
    ]
    lines = ["## Evaluation", ""]
    if evaluation.get("holdout_rows") is not None:
        lines += [
            f"On {evaluation['holdout_rows']} held-out prompts the teacher answered, the student's figures:",
            "",
        ]
    lines += [header, divider, *rows]
    if lead := control_lead_sentence(evaluation.get("leads")):
        lines += ["", lead]
    notes = evaluation.get("notes") or []
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


@dataclass(frozen=True)
class CardSettings:
    """What a card was written from, besides the teacher: the training settings and the data."""

    training: TrainingSpec
    data: dict[str, Any]


_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


def card_settings(card: str) -> CardSettings | None:
    """The settings kept in a card's front matter by `model_card`; None for a card that has none."""
    match = _FRONT_MATTER.match(card)
    if match is None:
        return None
    try:
        kept = (yaml.safe_load(match.group(1)) or {}).get("stillhouse")
        if not isinstance(kept, Mapping):
            return None
        return CardSettings(TrainingSpec.model_validate(kept["training"]), dict(kept.get("data") or {}))
    except (yaml.YAMLError, KeyError, AttributeError, ValidationError):
        return None
