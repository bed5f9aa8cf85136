"""Stage 5: the student against the teacher, on the teacher's answers to the held-out prompts.

Three models are compared: the teacher (from the figures stored with its answers), the baseline (the
student before training) and the student. Two kinds of figures:

- token level, by teacher forcing on the teacher's responses: KL(teacher ‖ model) per token over the
  teacher's stored top-k and the tail (the KL of `losses.distillation_loss`, forward KL at T = 1),
  top-1 agreement with the teacher, and perplexity. KL and top-1 compare distributions over one
  vocabulary, so they exist only when the student shares the teacher's tokenizer and the teacher stored
  logprobs; perplexity always does (per token of the model's own tokenizer). KL and top-1 are per token
  of the positions where the teacher's top-1 is known: a position with every stored alternative masked
  (an end-of-sequence label added after the server left it out) has neither, but counts for perplexity.
- answer level: each model's greedy answer (batched, left padding, up to `evaluation.maxNewTokens` new
  tokens) against the teacher's response: exact match and token F1 after SQuAD-style normalisation.
  When the teacher stopped for length, a model's answer is cut at the same number of tokens; a teacher
  response longer than `maxNewTokens` is compared by its first `maxNewTokens` tokens.

The headline, "the student recovers X% of the teacher", is the share of the baseline's gap to the
teacher that training closed, on KL when it is defined and on token F1 otherwise (`recovery`).

The metric functions come first and are functions of tensors and strings; `run_evaluation` is the
adapter that downloads the models, runs them, and writes the report and the published student.
"""

from __future__ import annotations

import gc
import json
import math
import posixpath
import re
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.jobspec import LossKind, LossSpec
from stillhouse.storage.artifacts import ArtifactExists, download_artifact, upload_folder
from stillhouse.storage.objects import ObjectStore
from stillhouse.storage.open_store import open_object_store
from stillhouse.storage.sparse_logprobs import SparseLogprobs
from stillhouse.teacher.backends.local_hf import DecodeRequest, default_stop_ids, generate_batch
from stillhouse.teacher.model_loading import ModelSource, default_device, load_model
from stillhouse.trainer import data, report
from stillhouse.trainer.losses import IGNORE_INDEX, MASKED_ID, SparseTeacher, distillation_loss
from stillhouse.trainer.model_card import card_settings
from stillhouse.trainer.publish import MODEL_CARD, is_committed, publish_student
from stillhouse.trainer.run_config import EvaluateRun
from stillhouse.trainer.student_init import check_tokenizers, teacher_tokenizer

log = structlog.get_logger(__name__)

# KL(teacher ‖ model) per token is the forward-KL distillation loss at temperature 1, without CE.
_KL = LossSpec.model_validate({"kind": LossKind.FORWARD_KL, "temperature": 1.0, "ceWeight": 0.0})
_NLL_ONLY = LossSpec(kind=LossKind.SFT)

TRAINING_LOG = "training_log.jsonl"


# --- answer level --------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised whitespace tokens (SQuAD); when either side has no tokens, 1 if both are
    empty, else 0."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token F1 of each prediction against its reference."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, and at least one; got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / len(pairs),
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / len(pairs),
    }


# --- token level ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTotals:
    """Sums over evaluated response tokens, so that batches add up: the number of tokens, their negative
    log-likelihood, their KL(teacher ‖ model) and the tokens where the model's top-1 is the teacher's
    (None where not defined), and `compared`: the tokens where the teacher's top-1 is known, which KL and
    top-1 agreement are per token of."""

    tokens: int = 0
    nll: float = 0.0
    kl: float | None = None
    top1_matches: int | None = None
    compared: int = 0

    def __add__(self, other: TokenTotals) -> TokenTotals:
        return TokenTotals(
            self.tokens + other.tokens,
            self.nll + other.nll,
            _add_optional(self.kl, other.kl),
            _add_optional(self.top1_matches, other.top1_matches),
            self.compared + other.compared,
        )

    def metrics(self) -> dict[str, float]:
        """Per-token figures: perplexity, and KL and top-1 agreement where defined (and some token had a
        known teacher top-1). Empty for no tokens."""
        if self.tokens == 0:
            return {}
        figures = {"perplexity": math.exp(self.nll / self.tokens)}
        if self.kl is not None and self.compared:
            figures["kl"] = self.kl / self.compared
        if self.top1_matches is not None and self.compared:
            figures["top1_agreement"] = self.top1_matches / self.compared
        return figures


def _add_optional(a: float | None, b: float | None) -> float | None:
    """Sums of a figure over batches; a batch that has none (no tokens) does not take it away."""
    if a is None or b is None:
        return b if a is None else a
    return a + b


def top1_matches(logits: torch.Tensor, labels: torch.Tensor, teacher_top1: torch.Tensor) -> int:
    """Positions with a label (labels != -100) where the model's most likely token is the teacher's
    most likely one. logits [B, T, V], labels and teacher_top1 [B, T] (-1 where it is not known, which
    never matches)."""
    counted = labels != IGNORE_INDEX
    return int(((logits.argmax(dim=-1) == teacher_top1) & counted).sum())


@torch.no_grad()
def model_token_totals(
    logits: torch.Tensor, labels: torch.Tensor, teacher: SparseTeacher | None
) -> TokenTotals:
    """The totals of one batch of teacher-forced logits [B, T, V] (position t predicts labels[:, t]);
    KL and top-1 agreement only when `teacher` (its top-k at each position) is given."""
    if teacher is None:
        nll = distillation_loss(logits, labels, _NLL_ONLY, None)
        return TokenTotals(nll.tokens, float(nll.ce) * nll.tokens)
    divergence = distillation_loss(logits, labels, _KL, teacher)
    # Masked slots come after the known ones: slot 0 is known wherever any is (losses.kd_tokens).
    return TokenTotals(
        divergence.tokens,
        float(divergence.ce) * divergence.tokens,
        float(divergence.kd) * divergence.tokens,
        top1_matches(logits, labels, teacher.ids[..., 0]),
        divergence.kd_tokens,
    )


def teacher_token_totals(answers: Iterable[SparseLogprobs]) -> TokenTotals:
    """The teacher's own totals, from the logprobs stored with its answers: KL 0, top-1 matches where the
    token it chose is its top-1 (over the positions whose top-1 is known, not masked), and the NLL of the
    chosen tokens. A chosen token outside the known top-k (a sampled, unlikely token, or one whose
    alternatives are all masked) counts with the tail's logprob: the most it can have (0 nats where
    nothing is known)."""
    totals = TokenTotals(kl=0.0, top1_matches=0)
    for answer in answers:
        if answer.num_tokens == 0 or answer.k == 0:
            continue
        chosen = answer.topk_ids == answer.token_ids[:, None]
        in_top_k = chosen.any(axis=1)
        chosen_logprob = np.where(chosen, answer.topk_logprobs, 0.0).sum(axis=1, dtype=np.float64)
        logprob = np.where(in_top_k, chosen_logprob, answer.tail_logprob)
        totals += TokenTotals(
            answer.num_tokens,
            -float(logprob.sum()),
            0.0,
            int((answer.topk_ids[:, 0] == answer.token_ids).sum()),
            int((answer.topk_ids[:, 0] != MASKED_ID).sum()),
        )
    return totals


# --- the headline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """How much of the teacher the student recovers: `percent` of the baseline's gap to the teacher on
    `metric` that training closed (None when the baseline has no gap to close)."""

    percent: float | None
    metric: str
    definition: str

    def as_dict(self) -> dict[str, Any]:
        return {"percent": self.percent, "metric": self.metric, "definition": self.definition}


KL_RECOVERY_DEFINITION = (
    "the share of the baseline's KL gap to the teacher that training closed: "
    "100 · (KL_baseline - KL_student) / KL_baseline, with KL(teacher ‖ model) per token on the teacher's "
    "held-out answers (the teacher's own is 0). 100% is a student that matches the teacher; 0% one no "
    "closer than the untrained student."
)
F1_RECOVERY_DEFINITION = (
    "the share of the baseline's token-F1 gap to the teacher that training closed: "
    "100 · (F1_student - F1_baseline) / (1 - F1_baseline), with the token F1 of greedy answers against the "
    "teacher's held-out responses (the teacher's own is 1), used because KL is not defined here. 100% is "
    "a student that answers as the teacher does; 0% one no closer than the untrained student."
)


def recovery(baseline: dict[str, float], student: dict[str, float]) -> Recovery:
    """The headline: on KL when both models have it, else on token F1."""
    if "kl" in baseline and "kl" in student:
        metric, teacher_value, definition = "kl", 0.0, KL_RECOVERY_DEFINITION
    else:
        metric, teacher_value, definition = "token_f1", 1.0, F1_RECOVERY_DEFINITION
    gap = teacher_value - baseline[metric]
    percent = None if abs(gap) < 1e-12 else 100.0 * (student[metric] - baseline[metric]) / gap
    return Recovery(percent, metric, definition)


# --- running the models --------------------------------------------------------------------------


class EvaluationError(Exception):
    """An evaluation that cannot run, for a reason the job's author can act on."""


# (what is happening, work done, work in all). The work is counted in held-out answers: each model is
# run on each answer twice (teacher-forced, then generating), and publishing counts as one more; 0 in
# all while the amount is not known yet.
Progress = Callable[[str, int, int], None]


def _work_in_all(answers: int) -> int:
    return 4 * answers + 1


@dataclass(frozen=True)
class EvaluationOutcome:
    report_prefix: str
    student_prefix: str  # the published student
    recovery_percent: float  # NaN when undefined (the baseline already matched the teacher)
    student_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    teacher_metrics: dict[str, float]


@dataclass(frozen=True)
class EvaluationSettings:
    """How hard the evaluation pushes the machine: positions per teacher-forced pass (its logits are
    [positions, vocabulary]) and prompts per generation batch."""

    tokens_per_pass: int
    generation_batch: int

    @classmethod
    def for_device(cls, device: torch.device) -> EvaluationSettings:
        return cls(16384, 64) if device.type == "cuda" else cls(2048, 16)


@dataclass
class Holdout:
    """The held-out answers as each model sees them."""

    answers: list[data.TokenizedAnswer]
    rows: dict[str, dict[str, Any]]  # answers rows by prompt id
    topk: int  # k of the teacher's stored logprobs
    token_level: bool  # KL and top-1 agreement are defined
    references: list[str]  # what each answer's greedy generation is compared with
    new_tokens: list[int]  # how many tokens each model may generate for each answer
    notes: list[str] = field(default_factory=list)


def prepare_holdout(
    rows: Sequence[dict[str, Any]],
    topk: int,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_difference: str | None,
    *,
    max_seq_len: int,
    max_new_tokens: int,
) -> Holdout:
    """Tokenize the held-out answers for a student with `tokenizer`. `tokenizer_difference`: None when
    it is the teacher's, else why not (then KL and top-1 agreement are not defined)."""
    notes = []
    shares_vocabulary = tokenizer_difference is None and topk > 0
    counts = data.DataCounts()
    answers = list(
        data.tokenize_answers(
            rows, tokenizer, use_teacher_tokens=shares_vocabulary, max_seq_len=max_seq_len, counts=counts
        )
    )
    if not answers:
        raise EvaluationError(f"no held-out answer is left to evaluate on: {counts.describe()}")
    if counts.kept < counts.rows or counts.truncated:
        notes.append(f"Held-out answers: {counts.describe()}.")
    if tokenizer_difference is not None:
        notes.append(
            f"KL and top-1 agreement are omitted: they compare distributions over one vocabulary, and the "
            f"student's tokenizer differs from the teacher's ({tokenizer_difference}). Perplexity is per "
            "token of each model's own tokenizer, so the teacher's is not comparable with the students'."
        )
    elif topk == 0:
        notes.append("KL and top-1 agreement are omitted: the teacher stored no logprobs with its answers.")
    missing = sum(answer.teacher is None for answer in answers)
    if shares_vocabulary and missing:
        notes.append(
            f"KL and top-1 agreement are omitted: {missing} of {len(answers)} held-out answers have no "
            "stored teacher logprobs."
        )
    by_id = {row["prompt_id"]: row for row in rows}
    references, new_tokens = [], []
    for answer in answers:
        response = answer.response_ids
        if len(response) > max_new_tokens:
            references.append(tokenizer.decode(response[:max_new_tokens], skip_special_tokens=True))
        else:
            references.append(answer.response_text)
        stopped_for_length = by_id[answer.prompt_id]["finish_reason"] == "length"
        new_tokens.append(min(max_new_tokens, len(response)) if stopped_for_length else max_new_tokens)
    return Holdout(answers, by_id, topk, shares_vocabulary and not missing, references, new_tokens, notes)


def teacher_metrics(holdout: Holdout) -> dict[str, float]:
    """The teacher's figures on the held-out answers, from its stored logprobs (none when k = 0)."""
    if holdout.topk == 0:
        return {}
    stored = (SparseLogprobs.from_arrow(holdout.rows[a.prompt_id], holdout.topk) for a in holdout.answers)
    figures = teacher_token_totals(stored).metrics()
    if not holdout.token_level:
        figures.pop("kl", None)
        figures.pop("top1_agreement", None)
    return figures


@torch.inference_mode()
def teacher_forced_totals(
    model: PreTrainedModel,
    holdout: Holdout,
    pad_token_id: int,
    tokens_per_pass: int,
    advance: Callable[[int], None],
) -> TokenTotals:
    """Token-level totals of `model` on the held-out answers, packed into passes of at most
    `tokens_per_pass` positions (examples never attend to each other: see `data`)."""
    answers = holdout.answers
    longest = max(answer.positions for answer in answers)
    order = sorted(range(len(answers)), key=lambda index: answers[index].positions)
    totals = TokenTotals()
    for row in data.pack_rows(answers, order, max(tokens_per_pass, longest)):
        batch = data.collate(
            answers, [row], pad_token_id=pad_token_id, teacher_k=holdout.topk if holdout.token_level else None
        ).to(model.device)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        teacher = (
            SparseTeacher(batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail)
            if holdout.token_level
            else None
        )
        totals += model_token_totals(logits, batch.labels, teacher)
        advance(len(row))
    return totals


def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    holdout: Holdout,
    batch_size: int,
    advance: Callable[[int], None],
) -> list[str]:
    """Each held-out prompt answered greedily by `model`, in batches of prompts of similar length."""
    answers = holdout.answers
    order = sorted(range(len(answers)), key=lambda index: len(answers[index].prompt_ids))
    stops = default_stop_ids(model, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [""] * len(answers)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        requests = [DecodeRequest(answers[i].prompt_ids, holdout.new_tokens[i]) for i in chosen]
        decoded = generate_batch(model, requests, stops, pad_token_id)
        for index, row in zip(chosen, decoded, strict=True):
            texts[index] = tokenizer.decode(row.token_ids, skip_special_tokens=True)
        advance(len(chosen))
    return texts


def model_metrics(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    holdout: Holdout,
    device: torch.device,
    settings: EvaluationSettings,
    advance: Callable[[int], None],
) -> dict[str, float]:
    """Every figure of the model saved in `folder`: token level, then answer level."""
    model = load_model(ModelSource(folder), device)
    try:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        totals = teacher_forced_totals(model, holdout, pad_token_id, settings.tokens_per_pass, advance)
        predictions = greedy_answers(model, tokenizer, holdout, settings.generation_batch, advance)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return totals.metrics() | answer_metrics(predictions, holdout.references)


def published_student_prefix(run: EvaluateRun) -> str:
    """`jobs/<job-id>/student`: beside the job's `evaluate` folder."""
    return posixpath.join(posixpath.dirname(run.output_prefix), "student")


def report_prefix(run: EvaluateRun) -> str:
    return f"{run.output_prefix}/report"


def run_evaluation(run: EvaluateRun, progress: Progress) -> EvaluationOutcome:
    """Evaluate the baseline and the student against the teacher on the held-out answers, commit the
    report artifact and publish the student. A run whose report is already committed (a repeated or
    resumed evaluation) reads the figures from it and only publishes what is missing."""
    store = open_object_store(run.object_store)
    parallel = run.object_store.parallel_uploads
    lineage = {
        "job_id": run.job_id,
        "stage": "evaluate",
        "input_ids": [run.student_prefix, run.baseline_prefix, run.holdout_dataset_id],
    }
    published = published_student_prefix(run)
    with tempfile.TemporaryDirectory(prefix="stillhouse-evaluate-") as scratch:
        student_folder = None
        document = _committed_report(store, report_prefix(run))
        if document is None:
            progress("downloading the student and the baseline", 0, 0)
            student_folder, baseline_folder = Path(scratch, "student"), Path(scratch, "baseline")
            download_artifact(store, run.student_prefix, student_folder, parallel_files=parallel)
            download_artifact(store, run.baseline_prefix, baseline_folder, parallel_files=parallel)
            training_log = read_training_log(student_folder / TRAINING_LOG)
            document = _evaluate(run, store, student_folder, baseline_folder, training_log, progress)
            report.write_report(Path(scratch, "report"), document, training_log)
            try:
                upload_folder(store, report_prefix(run), Path(scratch, "report"), lineage=lineage)
            except ArtifactExists:  # a concurrent run of the same evaluation committed first
                document = _committed_report(store, report_prefix(run)) or document
        work = _work_in_all(document["data"]["holdout_rows"])
        progress("publishing the student", work - 1, work)
        publish_student(
            store,
            run.student_prefix,
            published,
            teacher=run.teacher,
            evaluation=card_evaluation(document),
            lineage=lineage,
            downloaded=student_folder,
            parallel_files=parallel,
        )
    progress("published the student", work, work)
    metrics = document["metrics"]
    percent = document["recovery"]["percent"]
    return EvaluationOutcome(
        report_prefix=report_prefix(run),
        student_prefix=published,
        recovery_percent=math.nan if percent is None else percent,
        student_metrics=metrics["student"],
        baseline_metrics=metrics["baseline"],
        teacher_metrics=metrics["teacher"],
    )


def card_evaluation(document: dict[str, Any]) -> dict[str, Any]:
    """What the model card shows of a report."""
    return {
        "metrics": document["metrics"],
        "recovery": document["recovery"],
        "holdout_rows": document["data"]["holdout_rows"],
        "notes": document["notes"],
    }


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a `training_log.jsonl` (one JSON object per line); none when there is no file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _committed_report(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """The report document of a committed report artifact; None when there is none (files of a run that
    stopped before committing do not count)."""
    if not is_committed(store, prefix):
        return None
    return json.loads(store.get_bytes(f"{prefix}/{report.REPORT_JSON}"))


def _evaluate(
    run: EvaluateRun,
    store: ObjectStore,
    student_folder: Path,
    baseline_folder: Path,
    training_log: list[dict[str, Any]],
    progress: Progress,
) -> dict[str, Any]:
    """The report document of one evaluation."""
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    teacher_tok = teacher_tokenizer(run.teacher)
    difference = (
        check_tokenizers(tokenizer, teacher_tok)
        if teacher_tok is not None
        else "the teacher's tokenizer is not known: set teacher.tokenizer"
    )
    topk = data.answers_topk(store, run.holdout_dataset_id)
    rows = list(data.read_answer_rows(store, run.holdout_dataset_id))
    holdout = prepare_holdout(
        rows,
        topk,
        tokenizer,
        difference,
        max_seq_len=_context_length(student_folder, tokenizer),
        max_new_tokens=run.evaluation.max_new_tokens,
    )
    device = default_device()
    settings = EvaluationSettings.for_device(device)
    total = _work_in_all(len(holdout.answers))
    done = 0
    metrics = {"teacher": teacher_metrics(holdout)}
    for name, folder in (("baseline", baseline_folder), ("student", student_folder)):

        def advance(count: int, name: str = name) -> None:
            nonlocal done
            done += count
            progress(f"the {name}", done, total)

        metrics[name] = model_metrics(folder, tokenizer, holdout, device, settings, advance)
        log.info("model evaluated", model=name, **metrics[name])
    headline = recovery(metrics["baseline"], metrics["student"])
    notes = list(holdout.notes)
    temperature = run.teacher.sampling.temperature
    if temperature > 0:
        notes.append(
            f"The teacher sampled its answers at temperature {temperature:g}: exact match and token F1 "
            "compare greedy answers with sampled ones, which even the teacher's own greedy answers would "
            "not always match."
        )
    if headline.percent is None:
        notes.append(f"Recovery is undefined: the baseline's {headline.metric} already equals the teacher's.")
    card = card_settings(_read_text(student_folder / MODEL_CARD))
    response_tokens = sum(len(answer.response_ids) for answer in holdout.answers)
    return report.build_report(
        job_id=run.job_id,
        teacher=run.teacher,
        training=card.training if card else None,
        student={
            "artifact": run.student_prefix,
            "baseline": run.baseline_prefix,
            "published": published_student_prefix(run),
        },
        data={
            "holdout_dataset": run.holdout_dataset_id,
            "holdout_rows": len(holdout.answers),
            "holdout_response_tokens": response_tokens,
            "teacher_topk": topk,
            "trained_on": card.data if card else {},
        },
        evaluation={
            "max_new_tokens": run.evaluation.max_new_tokens,
            "token_level": holdout.token_level,
            "device": str(device),
        },
        metrics=metrics,
        recovery=headline.as_dict(),
        training_log=training_log,
        notes=notes,
    )


def _context_length(folder: Path, tokenizer: PreTrainedTokenizerBase) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or tokenizer.model_max_length)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""
