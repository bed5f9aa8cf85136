"""The evaluate stage: the student against the teacher, on the teacher's answers to the held-out prompts.

Rows of the report, all on the same held-out answers: two context-free references (`references`: a
uniform distribution over the vocabulary, and a unigram fitted on the training answers), the untrained
student (the baseline), the SFT control when `evaluation.controls` lists `sft`, the student, and the
teacher (from the figures stored with its answers). Two kinds of figures:

- token level, by teacher forcing on the teacher's responses: KL(teacher ‖ model) per token over the
  teacher's stored top-k and the tail (the KL of `losses.distillation_loss`, forward KL at T = 1),
  top-1 agreement with the teacher, and perplexity. KL and top-1 compare distributions over one
  vocabulary, so they exist only when the student shares the teacher's tokenizer and the teacher stored
  logprobs; perplexity always does (per token of the model's own tokenizer). KL and top-1 are per token
  of the positions where the teacher's top-1 is known: a position with every stored alternative masked
  (an end-of-sequence label added after the server left it out) has neither, but counts for perplexity.
- answer level: each model's greedy answer (batched, left padding, up to `evaluation.maxNewTokens` new
  tokens) against the teacher's response: exact match and token F1 after SQuAD-style normalisation, and
  the share of repeated word 4-grams (`repeated_ngram_share`; the teacher's from its own responses).
  When the teacher stopped for length, a model's answer is cut at the same number of tokens; a teacher
  response longer than `maxNewTokens` is compared by its first `maxNewTokens` tokens. The uniform has no
  greedy answer (every token ties), so these are n/a for it. The report keeps the first held-out prompts
  with the teacher's answer and each trained model's greedy answer beside it (`answer_samples`).

The headline (`Headline`) is the share of the gap from the unigram to the teacher that the student
closes, on KL and on top-1 agreement (on token F1 when KL is not defined): a figure that a trivial model
cannot score well on, unlike a gap measured from the untrained student, which can be worse than uniform.
The report also gives the student's and the teacher's non-embedding parameter counts (`model_size`).

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
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.datasets.artifacts import ArtifactExists, download_artifact, upload_folder
from stillhouse.common.datasets.sparse_logprobs import MASKED_ID, SparseLogprobs
from stillhouse.common.headline import gap_closed_sentence
from stillhouse.common.jobspec import LossKind, LossSpec, TeacherBackend, TeacherSpec
from stillhouse.common.models.generation import DecodeRequest, default_stop_ids, generate_batch
from stillhouse.common.models.locator import Locate, ModelLocator
from stillhouse.common.models.model_loading import (
    ModelSource,
    default_device,
    load_config,
    load_model,
    resolve_model_reference,
)
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.trainer import data, report
from stillhouse.trainer.answer_samples import answer_samples
from stillhouse.trainer.failures import UserFixableError
from stillhouse.trainer.losses import IGNORE_INDEX, SparseTeacher, distillation_loss
from stillhouse.trainer.model_card import CardSettings, card_settings
from stillhouse.trainer.model_size import non_embedding_parameters
from stillhouse.trainer.paired_lead import per_token_lead
from stillhouse.trainer.publish import MODEL_CARD, is_committed, publish_student
from stillhouse.trainer.references import ContextFreeModel, uniform_model, unigram_counts, unigram_model
from stillhouse.trainer.run_config import AnswerSample, EvaluateRun, EvaluationOutcome, PairedLead
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


def repeated_ngram_share(texts: Iterable[str], n: int = 4) -> float | None:
    """The share of word n-grams that repeat an earlier n-gram of the same text: Σ (total - distinct) /
    Σ total, over the n-grams of each text's lower-cased whitespace words. 0 for texts that never repeat
    themselves, near 1 for a loop; None when no text has n words."""
    total = repeated = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else None


def greedy_answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The answer-level figures of greedy answers: exact match and token F1 against the references, and
    the share of repeated 4-grams (when any answer has four words)."""
    figures = answer_metrics(predictions, references)
    repeated = repeated_ngram_share(predictions)
    if repeated is not None:
        figures["repeated_4grams"] = repeated
    return figures


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

# The metrics the headline measures the gap on, with the teacher's value where it is fixed (its KL to
# itself is 0; its answers are the reference of token F1); top-1 agreement takes the teacher's measured
# value (1 for a greedy teacher).
_FIXED_TEACHER_VALUES = {"kl": 0.0, "token_f1": 1.0}
GAP_METRICS = ("kl", "top1_agreement", "token_f1")

GAP_DEFINITION = (
    "the share of the gap from a context-free unigram (token frequencies of the training answers) to the "
    "teacher that the student closes, on the teacher's held-out answers: on KL(teacher ‖ model) per "
    "token, 100 · (KL_unigram - KL_student) / KL_unigram (the teacher's own KL is 0); on top-1 agreement, "
    "100 · (top1_student - top1_unigram) / (top1_teacher - top1_unigram); on token F1 (used when KL is not "
    "defined), 100 · (F1_student - F1_unigram) / (1 - F1_unigram). 100% is a student that matches the "
    "teacher, 0% one no better than the unigram, and below 0 one worse than it."
)


def gap_closed(reference: float, student: float, teacher: float) -> float | None:
    """100 · (student - reference) / (teacher - reference): the share of the reference's gap to the
    teacher that the student closes; None when the reference has no gap."""
    gap = teacher - reference
    return None if abs(gap) < 1e-12 else 100.0 * (student - reference) / gap


@dataclass(frozen=True)
class Headline:
    """The share of the unigram's gap to the teacher that the student closes, per metric of GAP_METRICS
    that the three of them have (None where the unigram has no gap), led by `metric`: KL when it is
    defined, else token F1. `percent` is the lead figure (the `recovery` field of the API and the report)."""

    gap_closed: dict[str, float | None]
    metric: str

    @property
    def percent(self) -> float | None:
        return self.gap_closed.get(self.metric)

    def sentence(self) -> str:
        return gap_closed_sentence(self.gap_closed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "metric": self.metric,
            "gap_closed": dict(self.gap_closed),
            "sentence": self.sentence(),
            "definition": GAP_DEFINITION,
        }


def headline(unigram: dict[str, float], student: dict[str, float], teacher: dict[str, float]) -> Headline:
    """The headline from the figures of the unigram reference, the student and the teacher."""
    closed = {}
    for metric in GAP_METRICS:
        target = _FIXED_TEACHER_VALUES.get(metric, teacher.get(metric))
        if target is not None and metric in unigram and metric in student:
            closed[metric] = gap_closed(unigram[metric], student[metric], target)
    return Headline(closed, "kl" if "kl" in closed else "token_f1")


# --- running the models --------------------------------------------------------------------------


class EvaluationError(UserFixableError):
    """An evaluation that cannot run, for a reason the job's author can act on."""


# (what is happening, work done, work in all). The work is counted in held-out answers: each trained
# model (untrained, student, controls) is run on each answer twice (teacher-forced, then generating),
# each context-free reference once (its greedy answer needs no model run), and publishing counts as one
# more; 0 in all while the amount is not known yet.
Progress = Callable[[str, int, int], None]

TRAINED_MODELS = ("baseline", "control-sft", "student")
# Trained beside the student with the same steps and tokens: the student's lead over each is reported.
CONTROL_MODELS = ("control-sft",)
REFERENCE_MODELS = ("uniform", "unigram")


def _work_in_all(answers: int, trained_models: int) -> int:
    return (2 * trained_models + len(REFERENCE_MODELS)) * answers + 1


@dataclass(frozen=True)
class EvaluationSettings:
    """How hard the evaluation pushes the machine: positions per teacher-forced pass (its logits are
    [positions, vocabulary]) and prompts per generation batch."""

    tokens_per_pass: int
    generation_batch: int

    @classmethod
    def for_device(cls, device: torch.device) -> EvaluationSettings:
        return cls(16384 if device.type == "cuda" else 2048, 64)


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
    """The teacher's figures on the held-out answers: token level from its stored logprobs (none when
    k = 0), and the share of repeated 4-grams in its responses (as the models' answers are compared)."""
    figures = {}
    if holdout.topk > 0:
        stored = (SparseLogprobs.from_arrow(holdout.rows[a.prompt_id], holdout.topk) for a in holdout.answers)
        figures = teacher_token_totals(stored).metrics()
        if not holdout.token_level:
            figures.pop("kl", None)
            figures.pop("top1_agreement", None)
    repeated = repeated_ngram_share(holdout.references)
    if repeated is not None:
        figures["repeated_4grams"] = repeated
    return figures


@torch.inference_mode()
def teacher_forced_totals(
    model: PreTrainedModel | ContextFreeModel,
    holdout: Holdout,
    pad_token_id: int,
    tokens_per_pass: int,
    advance: Callable[[int], None],
) -> list[TokenTotals]:
    """Token-level totals of `model` on each held-out answer (in the order of `holdout.answers`), packed
    into passes of at most `tokens_per_pass` positions (examples never attend to each other: see
    `data`)."""
    answers = holdout.answers
    longest = max(answer.positions for answer in answers)
    order = sorted(range(len(answers)), key=lambda index: answers[index].positions)
    per_answer = [TokenTotals()] * len(answers)
    for row in data.pack_rows(answers, order, max(tokens_per_pass, longest)):
        batch = data.collate(
            answers, [row], pad_token_id=pad_token_id, teacher_k=holdout.topk if holdout.token_level else None
        ).to(model.device)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        start = 0
        for index in row:
            span = slice(start, start + answers[index].positions)
            teacher = (
                SparseTeacher(
                    batch.teacher_ids[:, span], batch.teacher_logprobs[:, span], batch.teacher_tail[:, span]
                )
                if holdout.token_level
                else None
            )
            per_answer[index] = model_token_totals(logits[:, span], batch.labels[:, span], teacher)
            start = span.stop
        advance(len(row))
    return per_answer


def summed(per_answer: Iterable[TokenTotals]) -> TokenTotals:
    return sum(per_answer, TokenTotals())


def student_lead(student: Sequence[TokenTotals], other: Sequence[TokenTotals]) -> dict[str, PairedLead]:
    """The student's lead over `other` (a control trained beside it) on KL and top-1 agreement, paired
    over the held-out answers (see `paired_lead`); empty where those are not defined."""
    compared = np.array([totals.compared for totals in student], np.float64)
    leads = {}
    for metric, total in (("kl", "kl"), ("top1_agreement", "top1_matches")):
        sums = [
            np.array([getattr(totals, total) or 0.0 for totals in model], np.float64)
            for model in (student, other)
        ]
        if (lead := per_token_lead(*sums, compared)) is not None:
            leads[metric] = lead
    return leads


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


@dataclass(frozen=True)
class ModelEvaluation:
    """What one model did on the held-out answers: its figures, and its token-level totals and greedy
    answer for each prompt (in the order of `Holdout.answers`)."""

    metrics: dict[str, float]
    per_answer: list[TokenTotals]
    answers: list[str]


def evaluate_model(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    holdout: Holdout,
    device: torch.device,
    settings: EvaluationSettings,
    advance: Callable[[int], None],
) -> ModelEvaluation:
    """Every figure of the model saved in `folder` (token level, then answer level), and its answers."""
    model = load_model(ModelSource(folder), device)
    try:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        per_answer = teacher_forced_totals(model, holdout, pad_token_id, settings.tokens_per_pass, advance)
        predictions = greedy_answers(model, tokenizer, holdout, settings.generation_batch, advance)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ModelEvaluation(
        summed(per_answer).metrics() | greedy_answer_metrics(predictions, holdout.references),
        per_answer,
        predictions,
    )


def context_free_metrics(
    model: ContextFreeModel,
    tokenizer: PreTrainedTokenizerBase,
    holdout: Holdout,
    settings: EvaluationSettings,
    advance: Callable[[int], None],
    *,
    has_top_token: bool,
) -> dict[str, float]:
    """The figures of a context-free reference: token level as for a model; when it has a most likely
    token (`has_top_token`; the uniform has none), top-1 agreement and the figures of its greedy answer,
    which is that token repeated up to each answer's budget (empty when the token ends a turn)."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    figures = summed(
        teacher_forced_totals(model, holdout, pad_token_id, settings.tokens_per_pass, advance)
    ).metrics()
    if not has_top_token:
        figures.pop("top1_agreement", None)
        return figures
    token = model.most_likely_token()
    predictions = [
        "" if token == tokenizer.eos_token_id else tokenizer.decode([token] * count, skip_special_tokens=True)
        for count in holdout.new_tokens
    ]
    return figures | greedy_answer_metrics(predictions, holdout.references)


def fit_unigram(
    store: ObjectStore,
    dataset_id: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_teacher_tokens: bool,
    max_seq_len: int,
    vocab_size: int,
) -> ContextFreeModel:
    """The unigram reference, fitted on the response tokens of the training answers, tokenized as the
    held-out ones are (the teacher's own ids when `use_teacher_tokens`)."""
    answers = data.tokenize_answers(
        data.read_answer_rows(store, dataset_id),
        tokenizer,
        use_teacher_tokens=use_teacher_tokens,
        max_seq_len=max_seq_len,
    )
    counts = unigram_counts(answers, vocab_size)
    if counts.sum() == 0:
        raise EvaluationError(
            f"the training answers {dataset_id} have no response tokens to fit a unigram on"
        )
    return unigram_model(counts)


def published_student_prefix(run: EvaluateRun) -> str:
    """`jobs/<job-id>/student`: beside the job's `evaluate` folder."""
    return posixpath.join(posixpath.dirname(run.output_prefix), "student")


def report_prefix(run: EvaluateRun) -> str:
    return f"{run.output_prefix}/report"


def run_evaluation(run: EvaluateRun, progress: Progress) -> EvaluationOutcome:
    """Evaluate the references, the baseline, the student (and its controls) against the teacher on the
    held-out answers, commit the report artifact and publish the student. A run whose report is already
    committed (a repeated or resumed evaluation) reads the figures from it and only publishes what is
    missing."""
    store = open_object_store(run.object_store)
    parallel = run.object_store.parallel_uploads
    trained = _trained_prefixes(run)
    lineage = {
        "job_id": run.job_id,
        "stage": "evaluate",
        "input_ids": [*trained.values(), run.holdout_dataset_id, run.training_dataset_id],
    }
    published = published_student_prefix(run)
    with tempfile.TemporaryDirectory(prefix="stillhouse-evaluate-") as scratch:
        folders = None
        document = _committed_report(store, report_prefix(run))
        if document is None:
            progress(f"downloading the {', '.join(trained)}", 0, 0)
            folders = {name: Path(scratch, name) for name in trained}
            for name, prefix in trained.items():
                download_artifact(store, prefix, folders[name], parallel_files=parallel)
            training_log = read_training_log(folders["student"] / TRAINING_LOG)
            document = _evaluate(run, store, folders, training_log, progress)
            report.write_report(Path(scratch, "report"), document, training_log)
            try:
                upload_folder(store, report_prefix(run), Path(scratch, "report"), lineage=lineage)
            except ArtifactExists:  # a concurrent run of the same evaluation committed first
                document = _committed_report(store, report_prefix(run)) or document
        work = _work_in_all(document["data"]["holdout_rows"], len(trained))
        progress("publishing the student", work - 1, work)
        publish_student(
            store,
            run.student_prefix,
            published,
            teacher=run.teacher,
            evaluation=card_evaluation(document),
            lineage=lineage,
            downloaded=folders["student"] if folders else None,
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
        reference_metrics={
            name: metrics[name] for name in (*REFERENCE_MODELS, "control-sft") if name in metrics
        },
        gap_closed={
            metric: value for metric, value in document["recovery"]["gap_closed"].items() if value is not None
        },
        # A report committed before it kept leads has none.
        control_sft_lead=document.get("leads", {}).get("control-sft", {}),
        # A report committed before it kept samples has none.
        samples=[AnswerSample.model_validate(sample) for sample in document.get("samples", [])],
    )


def _trained_prefixes(run: EvaluateRun) -> dict[str, str]:
    """The trained models to evaluate (TRAINED_MODELS that the run has), by name, in evaluation order."""
    prefixes = {
        "baseline": run.baseline_prefix,
        "control-sft": run.control_sft_prefix,
        "student": run.student_prefix,
    }
    return {name: prefixes[name] for name in TRAINED_MODELS if prefixes[name] is not None}


def card_evaluation(document: dict[str, Any]) -> dict[str, Any]:
    """What the model card shows of a report."""
    return {
        "metrics": document["metrics"],
        "recovery": document["recovery"],
        # A report committed before it kept leads has none.
        "leads": document.get("leads", {}),
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
    folders: dict[str, Path],
    training_log: list[dict[str, Any]],
    progress: Progress,
) -> dict[str, Any]:
    """The report document of one evaluation; `folders`: the trained models, downloaded, by name."""
    student_folder = folders["student"]
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    max_seq_len = _context_length(student_folder, tokenizer)
    holdout = _student_holdout(run, store, tokenizer, max_seq_len)
    device = default_device()
    settings = EvaluationSettings.for_device(device)
    work = _WorkDone(progress, _work_in_all(len(holdout.answers), len(folders)))
    student_config = AutoConfig.from_pretrained(student_folder)
    vocab_size = student_config.get_text_config().vocab_size
    work.report("fitting the unigram on the training answers")
    unigram = fit_unigram(
        store,
        run.training_dataset_id,
        tokenizer,
        use_teacher_tokens=holdout.token_level,
        max_seq_len=max_seq_len,
        vocab_size=vocab_size,
    )
    metrics: dict[str, dict[str, float]] = {
        "uniform": context_free_metrics(
            uniform_model(vocab_size, device),
            tokenizer,
            holdout,
            settings,
            work.advancing("uniform"),
            has_top_token=False,
        ),
        "unigram": context_free_metrics(
            unigram.to(device), tokenizer, holdout, settings, work.advancing("unigram"), has_top_token=True
        ),
    }
    answers: dict[str, list[str]] = {}
    per_answer: dict[str, list[TokenTotals]] = {}
    for name, folder in folders.items():
        evaluated = evaluate_model(folder, tokenizer, holdout, device, settings, work.advancing(name))
        metrics[name], answers[name] = evaluated.metrics, evaluated.answers
        per_answer[name] = evaluated.per_answer
        log.info("model evaluated", model=name, **metrics[name])
    metrics["teacher"] = teacher_metrics(holdout)
    leads = {
        name: {
            metric: lead.model_dump()
            for metric, lead in student_lead(per_answer["student"], per_answer[name]).items()
        }
        for name in CONTROL_MODELS
        if name in per_answer and holdout.token_level
    }
    return _report_document(
        run,
        holdout,
        metrics,
        answer_samples(
            [holdout.rows[answer.prompt_id] for answer in holdout.answers], holdout.references, answers
        ),
        training_log,
        leads,
        card=card_settings(_read_text(student_folder / MODEL_CARD)),
        student_config=student_config,
        device=device,
    )


class _WorkDone:
    """The work done so far of `total` (see `Progress`), told to `progress` as it advances."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0

    def report(self, message: str) -> None:
        self._progress(message, self._done, self._total)

    def advancing(self, name: str) -> Callable[[int], None]:
        """Advances the work by a count of answers run through the model `name`."""

        def advance(count: int) -> None:
            self._done += count
            self.report(f"the {name}")

        return advance


def run_locator(run: EvaluateRun) -> Locate:
    return ModelLocator(run.models, run.object_store).locate


def _student_holdout(
    run: EvaluateRun, store: ObjectStore, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> Holdout:
    """The held-out answers as the student (and every model beside it) sees them, with its `tokenizer`."""
    teacher_tok = teacher_tokenizer(run.teacher, run_locator(run))
    difference = (
        check_tokenizers(tokenizer, teacher_tok)
        if teacher_tok is not None
        else "the teacher's tokenizer is not known: set teacher.tokenizer"
    )
    return prepare_holdout(
        list(data.read_answer_rows(store, run.holdout_dataset_id)),
        data.answers_topk(store, run.holdout_dataset_id),
        tokenizer,
        difference,
        max_seq_len=max_seq_len,
        max_new_tokens=run.evaluation.max_new_tokens,
    )


def _report_document(
    run: EvaluateRun,
    holdout: Holdout,
    metrics: dict[str, dict[str, float]],
    samples: list[dict[str, str]],
    training_log: list[dict[str, Any]],
    leads: dict[str, dict[str, dict[str, float]]],
    *,
    card: CardSettings | None,
    student_config: PretrainedConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The report document of the figures of every model; `leads`: the student's over each control
    (`student_lead`); `card`: what the student's model card says of its training."""
    lead = headline(metrics["unigram"], metrics["student"], metrics["teacher"])
    response_tokens = sum(len(answer.response_ids) for answer in holdout.answers)
    return report.build_report(
        job_id=run.job_id,
        teacher=run.teacher,
        training=card.training if card else None,
        student={
            "artifact": run.student_prefix,
            "baseline": run.baseline_prefix,
            "published": published_student_prefix(run),
            **({"control_sft": run.control_sft_prefix} if run.control_sft_prefix else {}),
        },
        model_size=model_sizes(
            student_config, run.teacher, ModelLocator(run.models, run.object_store).locate
        ),
        data={
            "holdout_dataset": run.holdout_dataset_id,
            "holdout_rows": len(holdout.answers),
            "holdout_response_tokens": response_tokens,
            "teacher_topk": holdout.topk,
            "unigram_fitted_on": run.training_dataset_id,
            "trained_on": card.data if card else {},
        },
        evaluation={
            "max_new_tokens": run.evaluation.max_new_tokens,
            "token_level": holdout.token_level,
            "device": str(device),
        },
        metrics=metrics,
        recovery=lead.as_dict(),
        leads=leads,
        samples=samples,
        training_log=training_log,
        notes=_report_notes(run, holdout, lead),
    )


def _report_notes(run: EvaluateRun, holdout: Holdout, lead: Headline) -> list[str]:
    """The report's notes: the held-out answers' own, then what the figures cannot say."""
    notes = list(holdout.notes)
    notes.append(
        "The uniform reference has no most likely token: its top-1 agreement and greedy answers (exact "
        "match, token F1, repeated 4-grams) are n/a."
    )
    temperature = run.teacher.sampling.temperature
    if temperature > 0:
        notes.append(
            f"The teacher sampled its answers at temperature {temperature:g}: exact match and token F1 "
            "compare greedy answers with sampled ones, which even the teacher's own greedy answers would "
            "not always match."
        )
    if lead.percent is None:
        notes.append(
            f"The gap closed is undefined: the unigram's {lead.metric} already equals the teacher's."
        )
    return notes


def model_sizes(student: PretrainedConfig, teacher: TeacherSpec, locate: Locate) -> dict[str, Any]:
    """The student's and the teacher's non-embedding parameters and their ratio; the teacher's only for a
    `local` teacher (an API teacher's architecture is not known here)."""
    sizes: dict[str, Any] = {"student_non_embedding_parameters": non_embedding_parameters(student)}
    if teacher.backend is TeacherBackend.LOCAL:
        source = resolve_model_reference(locate(teacher.model, "teacher.model"))
        config = load_config(source)
        sizes["teacher_non_embedding_parameters"] = non_embedding_parameters(config)
        sizes["student_to_teacher"] = (
            sizes["student_non_embedding_parameters"] / sizes["teacher_non_embedding_parameters"]
        )
    return sizes


def _context_length(folder: Path, tokenizer: PreTrainedTokenizerBase) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or tokenizer.model_max_length)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""
