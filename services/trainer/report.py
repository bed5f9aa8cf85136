"""The evaluation report: one JSON document, and the same figures as a Markdown and an HTML page.

`build_report` assembles the JSON (pure), with the first held-out answers side by side (`samples`, see
`answer_samples`); `loss_curve_png` draws the training curve from the student's
training log; `write_report` writes ``report.json``, ``report.md``, ``report.html`` and ``loss_curve.png``
into a folder, ready to upload as one artifact. The HTML page is self-contained: the curve is embedded
in it as a base64 data URL, so it can be opened from anywhere without the PNG beside it.

The metric names, labels and definitions live here (`METRICS`), so that the report and the model card
describe the figures in the same words.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stillhouse.common.headline import lead_sentence
from stillhouse.common.jobspec import TeacherSpec, TrainingSpec
from stillhouse.trainer.answer_samples import SAMPLE_CHARACTERS, sample_key

REPORT_FORMAT = "stillhouse.report/v1"
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
LOSS_CURVE_PNG = "loss_curve.png"

# Reference rows first, then what training made, then the teacher (the columns of the pages, in order).
MODELS = ("uniform", "unigram", "baseline", "control-sft", "student", "teacher")
MODEL_LABELS = {
    "uniform": "Uniform",
    "unigram": "Unigram",
    "baseline": "Untrained student",
    "control-sft": "SFT control",
    "student": "Student",
    "teacher": "Teacher",
}
MISSING = "n/a"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    number_format: str
    better: str  # "lower" or "higher"
    definition: str


METRICS = (
    Metric(
        "kl",
        "KL(teacher ‖ model) per token",
        ".4f",
        "lower",
        "Mean over the teacher's held-out response tokens (teacher forcing) of the KL divergence, in nats, "
        "from the teacher's distribution to the model's, both taken over the teacher's stored top-k tokens "
        "and one bucket for the rest of the mass. 0 for the teacher itself. Defined only when the model "
        "shares the teacher's tokenizer and the teacher gave logprobs.",
    ),
    Metric(
        "top1_agreement",
        "Top-1 agreement",
        ".3f",
        "higher",
        "Share of the teacher's held-out response tokens where the model's most likely next token is the "
        "teacher's most likely one. For the teacher: the share of its own chosen tokens that were its "
        "top-1 (1 under greedy decoding).",
    ),
    Metric(
        "perplexity",
        "Perplexity on the teacher's answers",
        ",.2f",
        "lower",
        "exp of the mean negative log-likelihood of the teacher's held-out responses under the model, per "
        "token of the model's tokenizer. For the teacher: from its stored logprobs of the tokens it chose "
        "(a chosen token outside its stored top-k counts with the tail's logprob).",
    ),
    Metric(
        "exact_match",
        "Exact match",
        ".3f",
        "higher",
        "Share of held-out prompts where the model's greedy answer equals the teacher's response after "
        "normalisation (lower case, no punctuation, no articles a/an/the, single spaces). The teacher's "
        "responses are the reference, so the teacher has none.",
    ),
    Metric(
        "token_f1",
        "Token F1",
        ".3f",
        "higher",
        "Mean over held-out prompts of the F1 of the whitespace tokens of the model's greedy answer against "
        "the teacher's response, after the same normalisation (SQuAD-style).",
    ),
    Metric(
        "repeated_4grams",
        "Repeated 4-grams",
        ".3f",
        "lower",
        "Share of the word 4-grams of the greedy answers that repeat an earlier 4-gram of the same answer: "
        "Σ (total - distinct) / Σ total over the answers, words being the lower-cased whitespace tokens. "
        "0 for answers that never repeat themselves, near 1 for a loop. For the teacher: its own held-out "
        "responses.",
    ),
)
METRIC_DEFINITIONS = {metric.key: metric.definition for metric in METRICS}


@dataclass(frozen=True)
class MetricRow:
    label: str
    better: str
    cells: tuple[str, ...]  # one per model of `models_in`, MISSING where the figure is not defined


def models_in(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The models of MODELS that `metrics` has a row for (the SFT control only when it was trained)."""
    return [model for model in MODELS if model in metrics]


def metric_rows(metrics: Mapping[str, Mapping[str, float]]) -> list[MetricRow]:
    """The table of figures: one row per metric that at least one model has, cells in `models_in` order."""
    rows = []
    for metric in METRICS:
        values = [metrics[model].get(metric.key) for model in models_in(metrics)]
        if all(value is None for value in values):
            continue
        cells = tuple(MISSING if value is None else format(value, metric.number_format) for value in values)
        rows.append(MetricRow(metric.label, metric.better, cells))
    return rows


def format_count(count: int) -> str:
    """A parameter count as people say it: 1.2M, 135M, 7.2B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def model_size_sentence(sizes: Mapping[str, Any]) -> str:
    """The student's and the teacher's non-embedding parameter counts, and their ratio, in words."""
    student = format_count(sizes["student_non_embedding_parameters"])
    if "teacher_non_embedding_parameters" not in sizes:
        return f"The student has {student} non-embedding parameters; the teacher's are not known."
    teacher = format_count(sizes["teacher_non_embedding_parameters"])
    return (
        f"The student has {student} non-embedding parameters, the teacher {teacher}: "
        f"{sizes['student_to_teacher']:.3f} of the teacher's."
    )


# --- the JSON document ---------------------------------------------------------------------------


def teacher_summary(teacher: TeacherSpec) -> dict[str, Any]:
    """What identifies the teacher and its answers (no limits, budget or secret names)."""
    return teacher.model_dump(
        mode="json",
        by_alias=True,
        include={"backend", "model", "base_url", "revision", "sampling", "top_logprobs"},
    )


def training_summary(log: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Figures of a training run from its log (one entry per reported step); None for an empty log."""
    if not log:
        return None
    last = log[-1]
    losses = [float(entry["loss"]) for entry in log if "loss" in entry]
    speeds = [float(entry["tokens_per_second"]) for entry in log if "tokens_per_second" in entry]
    summary: dict[str, Any] = {"steps": int(last.get("step", len(log))), "logged_steps": len(log)}
    for key in ("tokens", "epoch"):
        if key in last:
            summary[key] = last[key]
    if losses:
        summary |= {"first_loss": losses[0], "final_loss": losses[-1], "min_loss": min(losses)}
    for key in ("kd", "ce", "learning_rate"):
        if key in last:
            summary[f"final_{key}"] = float(last[key])
    if speeds:
        summary["mean_tokens_per_second"] = sum(speeds) / len(speeds)
    return summary


def build_report(
    *,
    job_id: str,
    teacher: TeacherSpec,
    training: TrainingSpec | None,
    student: Mapping[str, Any],
    model_size: Mapping[str, Any],
    data: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, float]],
    recovery: Mapping[str, Any],
    training_log: Sequence[Mapping[str, Any]],
    leads: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    notes: Sequence[str] = (),
    samples: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """The report as JSON-ready data. `student`: where the models are (artifacts, init); `model_size`:
    non-embedding parameter counts (`evaluation.model_sizes`); `data`: dataset ids and sizes;
    `evaluation`: its settings; `metrics`: per model of MODELS that was evaluated, metric key -> value;
    `recovery`: the headline (percent, metric, gap_closed per metric, sentence, definition); `leads`: per
    control trained beside the student, the student's lead on each metric with its interval; `notes`: what
    could not be measured, and why; `samples`: the first held-out answers side by side (prompt_id, prompt,
    teacher, baseline, student, control_sft when it was trained)."""
    return {
        "format": REPORT_FORMAT,
        "job_id": job_id,
        "created_at": datetime.now(UTC).isoformat(),
        "teacher": teacher_summary(teacher),
        "student": dict(student),
        "model_size": dict(model_size),
        "loss": training.loss.model_dump(mode="json", by_alias=True) if training else None,
        "data": dict(data),
        "evaluation": dict(evaluation),
        "metrics": {model: dict(metrics[model]) for model in models_in(metrics)},
        "metric_definitions": {
            key: definition
            for key, definition in METRIC_DEFINITIONS.items()
            if any(key in metrics[model] for model in models_in(metrics))
        },
        "recovery": dict(recovery),
        "leads": {control: dict(lead) for control, lead in (leads or {}).items()},
        "training": training_summary(training_log),
        "notes": list(notes),
        "samples": [dict(sample) for sample in samples],
    }


# --- the loss curve ------------------------------------------------------------------------------

_CURVES = (("loss", "loss"), ("kd", "KD"), ("ce", "cross-entropy"))


def loss_curve_png(log: Sequence[Mapping[str, Any]]) -> bytes | None:
    """The training loss over steps (and its KD and cross-entropy parts when the log has them and they
    are not all zero) as a PNG; None when the log has no losses."""
    steps = [entry.get("step", index + 1) for index, entry in enumerate(log)]
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    drawn = 0
    for key, label in _CURVES:
        points = [
            (step, float(entry[key]))
            for step, entry in zip(steps, log, strict=True)
            if key in entry and math.isfinite(float(entry[key]))
        ]
        if not points or (key != "loss" and all(value == 0 for _, value in points)):
            continue
        axes.plot([step for step, _ in points], [value for _, value in points], label=label, linewidth=1.5)
        drawn += 1
    if not drawn:
        return None
    axes.set_xlabel("step")
    axes.set_ylabel("loss per token")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --- the pages -----------------------------------------------------------------------------------


# The answers of a sample in the order the pages show them: the reference first, then what training made.
SAMPLE_MODELS = ("teacher", "baseline", "control-sft", "student")


@dataclass(frozen=True)
class SampleView:
    prompt_id: str
    prompt: str
    answers: tuple[tuple[str, str], ...]  # (model label, answer), in SAMPLE_MODELS order


def sample_views(samples: Sequence[Mapping[str, str | None]]) -> list[SampleView]:
    """The samples of a report as the pages show them: each model's answer under its label, leaving out
    the models a sample has no answer of (the SFT control when it was not trained)."""
    return [
        SampleView(
            sample["prompt_id"],
            sample["prompt"],
            tuple(
                (MODEL_LABELS[model], sample[sample_key(model)])
                for model in SAMPLE_MODELS
                if sample.get(sample_key(model)) is not None
            ),
        )
        for sample in samples
    ]


# What Markdown would read as markup, HTML or an entity anywhere in a line, and at the start of one.
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&~])")
_MARKDOWN_LINE_START = re.compile(r"^(\s*)([#+=-])")
EMPTY_ANSWER = "(empty)"


def markdown_quote(text: str) -> str:
    """`text` as a Markdown blockquote that shows it as written: markup characters escaped, each line
    break kept (a hard break), blank lines kept inside the quote; an empty text shows as (empty)."""
    if not text.strip():
        return f"> *{EMPTY_ANSWER}*"
    lines = text.splitlines()
    quoted = []
    for index, line in enumerate(lines):
        escaped = _MARKDOWN_LINE_START.sub(r"\1\\\2", _MARKDOWN_INLINE.sub(r"\\\1", line.rstrip()))
        if not escaped:
            quoted.append(">")
            continue
        continued = index + 1 < len(lines) and lines[index + 1].strip()
        quoted.append(f"> {escaped}\\" if continued else f"> {escaped}")
    return "\n".join(quoted)


def _environment(autoescape: bool) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["tojson_pretty"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False)
    environment.filters["markdown_quote"] = markdown_quote
    return environment


def _template_source(name: str) -> str:
    return resources.files("stillhouse.trainer").joinpath(name).read_text(encoding="utf-8")


_SECTIONS = (
    ("Teacher", "teacher"),
    ("Student", "student"),
    ("Model size", "model_size"),
    ("Loss", "loss"),
    ("Data", "data"),
    ("Evaluation", "evaluation"),
    ("Training", "training"),
)


def shown(value: Any) -> str:
    """A setting or figure as a page shows it: numbers to 4 significant digits (2.0 and 2 alike)."""
    return format(value, ".4g") if isinstance(value, float) else str(value)


def flat_items(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, shown value) of a nested mapping, leaving out what is None."""
    items = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            items.extend(flat_items(value, f"{prefix}{key}."))
        elif value is not None:
            items.append((f"{prefix}{key}", shown(value)))
    return items


def control_lead_sentence(leads: Mapping[str, Any] | None) -> str:
    """The student's lead over the SFT control in words, from a report's `leads` ("" without one)."""
    return lead_sentence((leads or {}).get("control-sft", {}), "the SFT control")


def _page_context(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "report": report,
        "sections": [(title, flat_items(report[key] or {})) for title, key in _SECTIONS],
        "models": [MODEL_LABELS[model] for model in models_in(report["metrics"])],
        "model_size": model_size_sentence(report["model_size"]),
        # A report written before it kept leads has none.
        "control_lead": control_lead_sentence(report.get("leads")),
        "rows": metric_rows(report["metrics"]),
        "definitions": [
            (metric.label, report["metric_definitions"][metric.key])
            for metric in METRICS
            if metric.key in report["metric_definitions"]
        ],
        # A report written before it kept samples has none.
        "samples": sample_views(report.get("samples", [])),
        "sample_characters": SAMPLE_CHARACTERS,
        "empty_answer": EMPTY_ANSWER,
    }


def render_markdown(report: Mapping[str, Any], has_curve: bool) -> str:
    template = _environment(autoescape=False).get_template("report.md.j2")
    return template.render(**_page_context(report), curve_file=LOSS_CURVE_PNG if has_curve else None)


def render_html(report: Mapping[str, Any], curve_png: bytes | None) -> str:
    curve = base64.b64encode(curve_png).decode() if curve_png else None
    return (
        _environment(autoescape=True)
        .get_template("report.html.j2")
        .render(**_page_context(report), curve=curve)
    )


def write_report(folder: Path, report: Mapping[str, Any], training_log: Sequence[Mapping[str, Any]]) -> None:
    """The report's files in `folder` (created if needed): JSON, Markdown, HTML, and the loss curve PNG
    when the training log has losses."""
    folder.mkdir(parents=True, exist_ok=True)
    curve = loss_curve_png(training_log)
    (folder / REPORT_JSON).write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / REPORT_MARKDOWN).write_text(render_markdown(report, curve is not None), encoding="utf-8")
    (folder / REPORT_HTML).write_text(render_html(report, curve), encoding="utf-8")
    if curve is not None:
        (folder / LOSS_CURVE_PNG).write_bytes(curve)
