"""Evaluation: the metric functions on hand-made inputs, then whole evaluations of tiny random models on
a held-out answers dataset written by a tiny teacher."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.datasets.artifacts import download_artifact, read_artifact_manifest, upload_folder
from stillhouse.common.datasets.records import prompt_id
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.common.jobspec import EvaluationSpec, TeacherBackend, TeacherSpec, TrainingSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer import evaluation, report
from stillhouse.trainer.answer_samples import SAMPLE_PROMPTS
from stillhouse.trainer.data import answers_topk, read_answer_rows
from stillhouse.trainer.evaluation import (
    EvaluationSettings,
    TokenTotals,
    answer_metrics,
    exact_match,
    gap_closed,
    headline,
    model_token_totals,
    normalize_answer,
    prepare_holdout,
    repeated_ngram_share,
    run_evaluation,
    summed,
    teacher_forced_totals,
    teacher_token_totals,
    token_f1,
    top1_matches,
)
from stillhouse.trainer.losses import SparseTeacher
from stillhouse.trainer.model_card import card_settings, model_card
from stillhouse.trainer.run_config import AnswerSample, EvaluateRun

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
    "How do bees make honey?",
    "Name a large ocean.",
    "What does a compiler do?",
]
HOLDOUT = "jobs/job-1/teacher/holdout"
TRAIN_PROMPTS = [
    "What is the capital of Italy?",
    "Write a limerick about a cat.",
    "Explain rain to a child.",
    "Name two even numbers.",
    "Why is grass green?",
    "Say goodbye in French.",
    "What is a hash table?",
    "Describe a sunrise.",
]
TRAIN_ANSWERS = "jobs/job-1/teacher/answers"
MAX_NEW_TOKENS = 12

# --- answer level --------------------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The Cat,  sat on A mat! ") == "cat sat on mat"


def test_exact_match_after_normalisation():
    assert exact_match("The cat sat.", "cat  SAT") == 1.0
    assert exact_match("The cat sat.", "the dog sat") == 0.0


def test_token_f1_on_known_strings():
    # prediction tokens: cat sat on mat; reference: cat sat -> precision 2/4, recall 2/2
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert token_f1("sat sat", "sat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens count once
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "the") == 1.0  # both empty after normalisation
    assert token_f1("cat", "") == 0.0


def test_answer_metrics_average_over_prompts():
    figures = answer_metrics(["Paris.", "blue sky", "no"], ["paris", "the sky is blue", "yes"])
    assert figures["exact_match"] == pytest.approx(1 / 3)
    assert figures["token_f1"] == pytest.approx((1 + 2 * (2 / 2 * 2 / 3) / (1 + 2 / 3) + 0) / 3)
    with pytest.raises(ValueError, match="as many predictions as references"):
        answer_metrics(["a"], [])


# --- token level ---------------------------------------------------------------------------------


def _sparse_teacher_of(logits: torch.Tensor, k: int) -> SparseTeacher:
    """The exact top-k and tail of `logits` [B, T, V], as the teacher stage stores them."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    top, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return SparseTeacher(ids, top.float(), tail.float())


def test_top1_matches_count_only_labelled_positions():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])  # argmax 1, 0, 2
    teacher_top1 = torch.tensor([[1, 2, 2]])
    assert top1_matches(logits, torch.tensor([[7, 7, 7]]), teacher_top1) == 2
    assert top1_matches(logits, torch.tensor([[7, 7, -100]]), teacher_top1) == 1
    assert top1_matches(logits, torch.tensor([[7, 7, 7]]), torch.tensor([[1, -1, -1]])) == 1  # unknown


def test_a_position_with_nothing_of_the_teacher_known_counts_for_perplexity_only():
    # Position 0: the teacher's distribution, known. Position 1: an end-of-sequence label the server left
    # out, every slot masked. KL and top-1 are per token of position 0; perplexity covers both.
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 20, generator=generator) * 3
    known = _sparse_teacher_of(logits, k=3)
    teacher = SparseTeacher(
        torch.tensor([[known.ids[0, 0].tolist(), [-1, -1, -1]]]),
        torch.tensor([[known.logprobs[0, 0].tolist(), [-60.0] * 3]]),
        torch.tensor([[known.tail_logprob[0, 0].item(), 0.0]]),
    )
    labels = torch.tensor([[int(logits[0, 0].argmax()), 7]])
    figures = model_token_totals(logits, labels, teacher).metrics()
    assert figures["kl"] == pytest.approx(0.0, abs=1e-5)
    assert figures["top1_agreement"] == 1.0
    nll = -torch.log_softmax(logits[0], -1)[[0, 1], labels[0]].mean().item()
    assert figures["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_kl_is_zero_and_top1_total_for_the_teachers_own_distribution():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=generator) * 3
    labels = torch.randint(0, 50, (2, 5), generator=generator)
    labels[0, :2] = -100
    totals = model_token_totals(logits, labels, _sparse_teacher_of(logits, k=4))
    assert totals.tokens == 8
    assert totals.kl == pytest.approx(0.0, abs=1e-5)
    assert totals.top1_matches == 8
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][labels != -100]
    assert totals.metrics()["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_kl_matches_a_hand_computed_value():
    # Teacher: token 0 with p = 0.5, the other half in the tail. Student q = (0.25, 0.25, 0.5), so its
    # buckets are (0.25, 0.75): KL = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4/3).
    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    teacher = SparseTeacher(
        torch.tensor([[[0]]]), torch.tensor([[[math.log(0.5)]]]), torch.tensor([[math.log(0.5)]])
    )
    totals = model_token_totals(logits, torch.tensor([[2]]), teacher)
    figures = totals.metrics()
    assert figures["kl"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert figures["top1_agreement"] == 0.0  # the student's argmax is token 2
    assert figures["perplexity"] == pytest.approx(2.0, rel=1e-5)  # label 2 has q = 0.5


def test_without_a_teacher_only_perplexity_is_defined():
    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5], [0.1, 0.8, 0.1]]]))
    figures = model_token_totals(logits, torch.tensor([[2, 1]]), None).metrics()
    assert figures == {"perplexity": pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2), rel=1e-5)}


def test_totals_add_up_over_batches():
    a = TokenTotals(3, 6.0, 1.5, 2, compared=3)
    b = TokenTotals(1, 2.0, 0.5, 1, compared=1)
    assert (a + b).metrics() == {"perplexity": pytest.approx(math.e**2), "kl": 0.5, "top1_agreement": 0.75}
    # KL and top-1 are per token of the positions whose teacher top-1 is known.
    c = TokenTotals(2, 0.0, 0.0, 0, compared=0)
    assert (a + b + c).metrics()["top1_agreement"] == 0.75
    assert TokenTotals().metrics() == {}


def test_teacher_figures_from_its_stored_logprobs():
    answer = SparseLogprobs(
        token_ids=np.array([5, 7, 9], np.int32),
        topk_ids=np.array([[5, 6], [8, 7], [1, 2]], np.int32),
        topk_logprobs=np.array([[-0.1, -2.5], [-0.5, -1.2], [-0.3, -1.5]], np.float32),
        tail_logprob=np.array([-3.0, -2.0, -2.2], np.float32),
    )
    figures = teacher_token_totals([answer]).metrics()
    # chosen: top-1 (-0.1), second (-1.2), outside the top-k: the tail (-2.2)
    assert figures["perplexity"] == pytest.approx(math.exp((0.1 + 1.2 + 2.2) / 3), rel=1e-5)
    assert figures["top1_agreement"] == pytest.approx(1 / 3)
    assert figures["kl"] == 0.0


def test_teacher_top1_agreement_counts_only_positions_whose_top1_is_known():
    # Token 7's second alternative is masked; the end-of-sequence label 2 was added with nothing known
    # (every slot masked, tail 0), so it counts for perplexity with 0 nats and not for top-1.
    answer = SparseLogprobs(
        token_ids=np.array([5, 7, 2], np.int32),
        topk_ids=np.array([[5, 6], [7, -1], [-1, -1]], np.int32),
        topk_logprobs=np.array([[-0.1, -2.5], [-0.2, -60.0], [-60.0, -60.0]], np.float32),
        tail_logprob=np.array([-3.0, -1.7, 0.0], np.float32),
    )
    totals = teacher_token_totals([answer])
    assert (totals.tokens, totals.compared, totals.top1_matches) == (3, 2, 2)
    figures = totals.metrics()
    assert figures["top1_agreement"] == 1.0
    assert figures["perplexity"] == pytest.approx(math.exp((0.1 + 0.2 + 0.0) / 3), rel=1e-5)


# --- the headline --------------------------------------------------------------------------------


def test_gap_closed_from_the_unigram_to_the_teacher():
    # KL: the teacher's is 0, so the share is (KL_unigram - KL_student) / KL_unigram.
    assert gap_closed(5.0, 3.64, 0.0) == pytest.approx(27.2)
    # Top-1 agreement: from the unigram's 0.06 to the teacher's 1.0.
    assert gap_closed(0.06, 0.20, 1.0) == pytest.approx(100 * 0.14 / 0.94)
    assert gap_closed(0.5, 0.4, 0.5) is None  # no gap to close
    assert gap_closed(5.0, 6.0, 0.0) == pytest.approx(-20.0)  # worse than the unigram


def test_headline_on_kl_and_top1_when_defined_else_on_f1():
    unigram = {"kl": 5.0, "top1_agreement": 0.06, "token_f1": 0.02}
    teacher = {"kl": 0.0, "top1_agreement": 1.0}
    on_kl = headline(unigram, {"kl": 3.64, "top1_agreement": 0.20, "token_f1": 0.3}, teacher)
    assert on_kl.metric == "kl" and on_kl.percent == pytest.approx(27.2)
    assert on_kl.gap_closed == {
        "kl": pytest.approx(27.2),
        "top1_agreement": pytest.approx(14.89, abs=0.01),
        "token_f1": pytest.approx(100 * 0.28 / 0.98),
    }
    assert on_kl.sentence() == (
        "The student closes 27.2% of the gap from a context-free unigram to the teacher on held-out KL, "
        "14.9% on top-1 agreement."
    )
    assert "100 · (KL_unigram - KL_student) / KL_unigram" in on_kl.as_dict()["definition"]
    # Another tokenizer: no KL or top-1 agreement, so the headline is on token F1 (the teacher's is 1).
    on_f1 = headline({"token_f1": 0.2}, {"token_f1": 0.6}, {"perplexity": 3.0})
    assert (on_f1.metric, on_f1.percent) == ("token_f1", pytest.approx(50.0))
    assert "on the token F1 of its greedy answers" in on_f1.sentence()
    assert headline({"token_f1": 1.0}, {"token_f1": 1.0}, {}).percent is None
    assert "an undefined share" in headline({"token_f1": 1.0}, {"token_f1": 1.0}, {}).sentence()


def test_repeated_4grams_count_repeats_within_each_answer():
    # "a b c d a b c d": 5 four-grams, 4 distinct -> 1 repeat.
    assert repeated_ngram_share(["A b c d a b c d"]) == pytest.approx(1 / 5)
    # Another answer with the same 4-gram is not a repeat: only repeats within an answer count.
    assert repeated_ngram_share(["a b c d", "a b c d"]) == 0.0
    loop = " ".join(["a big team's"] * 10)  # 30 words, 27 four-grams, 3 distinct
    assert repeated_ngram_share([loop, "one two three"]) == pytest.approx(24 / 27)
    assert repeated_ngram_share(["too short", ""]) is None


# --- whole evaluations on tiny models ------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path, tiny_llama: Callable[..., Path]) -> dict[str, Path]:
    """A tiny teacher and two other random models of the same shape and vocabulary."""
    return {
        name: tiny_llama(tmp_path / name, seed=seed) for name, seed in (("teacher", 1), ("a", 2), ("b", 3))
    }


@pytest.fixture
def holdout(object_store: ObjectStore, models: dict[str, Path], answers_dataset: Callable[..., None]) -> str:
    """The teacher's answers to the held-out prompts, and to the training prompts (TRAIN_ANSWERS)."""
    answers_dataset(object_store, HOLDOUT, models["teacher"], PROMPTS, top_k=8, max_new_tokens=MAX_NEW_TOKENS)
    answers_dataset(
        object_store, TRAIN_ANSWERS, models["teacher"], TRAIN_PROMPTS, top_k=8, max_new_tokens=MAX_NEW_TOKENS
    )
    return HOLDOUT


TRAINING = TrainingSpec.model_validate({"loss": {"kind": "forward_kl"}, "epochs": 2})
TRAINING_LOG = [{"step": step, "loss": 4.0 / step, "kd": 4.0 / step, "ce": 5.0 / step} for step in (1, 2, 3)]


def _teacher_spec(teacher_dir: Path) -> TeacherSpec:
    # As the `answers_dataset` fixture answered: greedily, with top-8 logprobs.
    return TeacherSpec.model_validate(
        {
            "backend": TeacherBackend.LOCAL,
            "model": str(teacher_dir),
            "topLogprobs": 8,
            "sampling": {"temperature": 0.0, "maxTokens": MAX_NEW_TOKENS},
        }
    )


def _commit_model(store: ObjectStore, prefix: str, model_dir: Path, teacher: TeacherSpec) -> None:
    """A model folder as the training loop leaves it: weights, tokenizer, log and model card."""
    (model_dir / "training_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in TRAINING_LOG))
    card_data = {"dataset": "jobs/job-1/teacher/train", "rows": 40, "tokens": 480, "steps": 3}
    (model_dir / "README.md").write_text(model_card(teacher, TRAINING, card_data, None))
    upload_folder(store, prefix, model_dir)


def _evaluate_run(
    store: ObjectStore,
    settings: ObjectStoreSettings,
    models: dict[str, Path],
    *,
    student: str,
    baseline: str,
    job_id: str,
    control_sft: str | None = None,
) -> EvaluateRun:
    teacher = _teacher_spec(models["teacher"])
    _commit_model(store, f"jobs/{job_id}/train/student", models[student], teacher)
    _commit_model(store, f"jobs/{job_id}/train/baseline", models[baseline], teacher)
    if control_sft is not None:
        _commit_model(store, f"jobs/{job_id}/train/control-sft", models[control_sft], teacher)
    return EvaluateRun(
        job_id=job_id,
        student_prefix=f"jobs/{job_id}/train/student",
        baseline_prefix=f"jobs/{job_id}/train/baseline",
        holdout_dataset_id=HOLDOUT,
        training_dataset_id=TRAIN_ANSWERS,
        teacher=teacher,
        evaluation=EvaluationSpec(maxNewTokens=MAX_NEW_TOKENS, controls=["sft"] if control_sft else []),
        object_store=settings,
        output_prefix=f"jobs/{job_id}/evaluate",
    )


def _greedy_answers(model_dir: Path, prompts: list[str]) -> list[str]:
    """Each prompt answered greedily by the model in `model_dir`, one at a time by Hugging Face's own
    `generate` (every held-out teacher answer here has MAX_NEW_TOKENS tokens or ends on its own, so each
    model may generate MAX_NEW_TOKENS)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=False,
        )
        generated = model.generate(
            ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        texts.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def _samples_in_holdout_order(store: ObjectStore, samples: list[AnswerSample]) -> list[dict]:
    """The held-out rows the samples should show: the first SAMPLE_PROMPTS, in the dataset's order."""
    rows = list(read_answer_rows(store, HOLDOUT))[:SAMPLE_PROMPTS]
    prompts = {prompt_id([{"role": "user", "content": prompt}]): prompt for prompt in PROMPTS}
    assert len(samples) == SAMPLE_PROMPTS < len(PROMPTS)
    assert [sample.prompt_id for sample in samples] == [row["prompt_id"] for row in rows]
    assert [sample.prompt for sample in samples] == [prompts[row["prompt_id"]] for row in rows]
    assert [sample.teacher for sample in samples] == [row["response"] for row in rows]
    return rows


def test_each_answers_totals_are_its_own_when_answers_share_a_pass(
    object_store: ObjectStore, models: dict[str, Path], holdout: str
):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    answers = prepare_holdout(
        list(read_answer_rows(object_store, holdout)),
        answers_topk(object_store, holdout),
        tokenizer,
        None,
        max_seq_len=256,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model = AutoModelForCausalLM.from_pretrained(models["a"])
    passes: list[int] = []
    packed = teacher_forced_totals(model, answers, 0, 100_000, passes.append)
    assert max(passes) == len(answers.answers), "every answer in one pass"
    alone = [
        teacher_forced_totals(model, dataclasses.replace(answers, answers=[answer]), 0, 1, lambda _: None)[0]
        for answer in answers.answers
    ]
    for together, by_itself in zip(packed, alone, strict=True):
        assert together.tokens == by_itself.tokens > 0 and together.compared == by_itself.compared
        assert together.top1_matches == by_itself.top1_matches
        assert together.kl == pytest.approx(by_itself.kl, rel=1e-4)
        assert together.nll == pytest.approx(by_itself.nll, rel=1e-4)
    assert summed(packed).metrics() == pytest.approx(summed(alone).metrics(), rel=1e-5)
    # The answers' figures differ from each other, so a mix-up of their spans would show.
    assert len({round(totals.nll, 3) for totals in packed}) == len(packed)


def test_a_student_that_is_the_teacher_closes_all_of_the_gap(
    tmp_path: Path,
    object_store: ObjectStore,
    object_store_settings: ObjectStoreSettings,
    models: dict[str, Path],
    holdout: str,
):
    run = _evaluate_run(
        object_store, object_store_settings, models, student="teacher", baseline="a", job_id="job-1"
    )
    progress: list[tuple[str, int, int]] = []
    outcome = run_evaluation(run, lambda message, done, total: progress.append((message, done, total)))

    student, baseline, teacher = outcome.student_metrics, outcome.baseline_metrics, outcome.teacher_metrics
    assert outcome.recovery_percent == pytest.approx(100.0, abs=1.0)
    assert outcome.gap_closed["kl"] == outcome.recovery_percent
    assert outcome.gap_closed["top1_agreement"] == pytest.approx(100.0)
    assert student["kl"] < 0.01
    assert student["top1_agreement"] == 1.0
    assert student["exact_match"] == 1.0 and student["token_f1"] == 1.0
    assert baseline["kl"] > 1.0 and baseline["top1_agreement"] < 0.2 and baseline["exact_match"] == 0.0
    assert teacher["kl"] == 0.0 and teacher["top1_agreement"] == 1.0
    assert teacher["perplexity"] == pytest.approx(student["perplexity"], rel=0.05)
    # The student answers as the teacher does, so it repeats itself exactly as often.
    assert student.get("repeated_4grams") == teacher.get("repeated_4grams")

    # The references, on the same answers: the uniform's perplexity is the vocabulary size and it has no
    # top-1 or greedy answer; the unigram, fitted on other answers of the same teacher, has all figures.
    uniform, unigram = outcome.reference_metrics["uniform"], outcome.reference_metrics["unigram"]
    assert set(outcome.reference_metrics) == {"uniform", "unigram"}
    vocabulary = AutoModelForCausalLM.from_pretrained(models["teacher"]).config.vocab_size
    assert set(uniform) == {"kl", "perplexity"}
    assert uniform["perplexity"] == pytest.approx(vocabulary, rel=1e-4)
    assert {"kl", "top1_agreement", "perplexity", "exact_match", "token_f1"} <= set(unigram)
    assert 0 < unigram["kl"] < uniform["kl"]
    assert unigram["perplexity"] < uniform["perplexity"]

    # Two references once over every answer, two trained models twice each, then publishing.
    work = 6 * len(PROMPTS) + 1
    assert [entry for entry in progress if entry[0] == "the student"][-1] == ("the student", work - 1, work)
    assert progress[-1] == ("published the student", work, work)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(progress))

    # The report artifact: every file, the figures and the recovery with its definition.
    assert outcome.report_prefix == "jobs/job-1/evaluate/report"
    files = {record.path for record in read_artifact_manifest(object_store, outcome.report_prefix).files}
    assert files == {"report.json", "report.md", "report.html", "loss_curve.png"}
    document = json.loads(object_store.get_bytes("jobs/job-1/evaluate/report/report.json"))
    assert document["metrics"]["student"] == student
    assert list(document["metrics"]) == ["uniform", "unigram", "baseline", "student", "teacher"]
    assert document["recovery"]["metric"] == "kl" and "KL_unigram" in document["recovery"]["definition"]
    assert document["data"]["unigram_fitted_on"] == TRAIN_ANSWERS
    # The student is the teacher itself: the same non-embedding parameters (2 layers of 64, counted by hand).
    assert document["model_size"] == {
        "student_non_embedding_parameters": 74_048,
        "teacher_non_embedding_parameters": 74_048,
        "student_to_teacher": 1.0,
    }
    assert document["data"]["holdout_rows"] == len(PROMPTS)
    assert document["loss"]["kind"] == "forward_kl"
    assert document["training"]["steps"] == 3 and document["training"]["final_loss"] == pytest.approx(4 / 3)
    # Same tokenizer, logprobs for every answer, greedy teacher: only the uniform's n/a is explained.
    assert (
        len(document["notes"]) == 1 and "uniform reference has no most likely token" in document["notes"][0]
    )

    # The first held-out prompts side by side: the teacher's answers, the student's (the teacher's own
    # weights: the same answers) and the untrained student's (model "a"), as each answers greedily.
    rows = _samples_in_holdout_order(object_store, outcome.samples)
    assert [sample.student for sample in outcome.samples] == [sample.teacher for sample in outcome.samples]
    prompts = [sample.prompt for sample in outcome.samples]
    assert [sample.baseline for sample in outcome.samples] == _greedy_answers(models["a"], prompts)
    assert all(sample.control_sft is None for sample in outcome.samples)
    assert outcome.control_sft_lead == {}
    assert document["samples"] == [sample.model_dump(exclude_none=True) for sample in outcome.samples]
    assert len(document["samples"]) == len(rows)
    html = object_store.get_bytes("jobs/job-1/evaluate/report/report.html").decode()
    assert html.count('<section class="sample">') == SAMPLE_PROMPTS

    # The published student loads without Stillhouse and its card carries the figures.
    assert outcome.student_prefix == "jobs/job-1/student"
    published = tmp_path / "published"
    download_artifact(object_store, outcome.student_prefix, published)
    model = AutoModelForCausalLM.from_pretrained(published)
    assert AutoTokenizer.from_pretrained(published).eos_token == "<|im_end|>"
    assert model.config.num_hidden_layers == 2
    card = (published / "README.md").read_text()
    assert (
        f"The student closes {outcome.recovery_percent:.1f}% of the gap from a context-free unigram" in card
    )
    assert f"| {unigram['kl']:.4f} | {baseline['kl']:.4f} | {student['kl']:.4f} | 0.0000 |" in card
    settings = card_settings(card)
    assert settings is not None and settings.training == TRAINING and settings.data["rows"] == 40

    # Evaluating again reads the committed report: same figures, nothing committed twice.
    committed = [
        read_artifact_manifest(object_store, prefix)
        for prefix in (outcome.report_prefix, "jobs/job-1/student")
    ]
    again = run_evaluation(run, lambda *_: None)
    assert again == outcome
    assert [
        read_artifact_manifest(object_store, prefix)
        for prefix in (outcome.report_prefix, "jobs/job-1/student")
    ] == committed

    # A report committed before reports kept samples is read as it is: the same figures, no samples.
    older = _evaluate_run(
        object_store, object_store_settings, models, student="teacher", baseline="a", job_id="job-old"
    )
    del document["samples"]
    report.write_report(tmp_path / "older-report", document, TRAINING_LOG)
    upload_folder(object_store, "jobs/job-old/evaluate/report", tmp_path / "older-report")
    reread = run_evaluation(older, lambda *_: None)
    assert reread.samples == [] and reread.student_metrics == outcome.student_metrics
    assert reread.recovery_percent == outcome.recovery_percent


def test_a_random_student_closes_no_gap_and_the_sft_control_is_evaluated_like_it(
    object_store: ObjectStore,
    object_store_settings: ObjectStoreSettings,
    models: dict[str, Path],
    holdout: str,
):
    run = _evaluate_run(
        object_store,
        object_store_settings,
        models,
        student="a",
        baseline="b",
        job_id="job-2",
        control_sft="teacher",
    )
    outcome = run_evaluation(run, lambda *_: None)
    student, teacher = outcome.student_metrics, outcome.teacher_metrics
    unigram = outcome.reference_metrics["unigram"]
    # A random model is further from the teacher than token frequencies are: it closes none of the gap.
    assert student["kl"] > unigram["kl"]
    assert outcome.recovery_percent < 0 and outcome.gap_closed["kl"] == outcome.recovery_percent
    assert student["top1_agreement"] < 0.2
    assert student["exact_match"] == 0.0
    assert student["perplexity"] > 10 * teacher["perplexity"]
    # The SFT control (here the teacher's own weights) is a row of its own, measured like the student.
    control = outcome.reference_metrics["control-sft"]
    assert control["kl"] < 0.01 and control["top1_agreement"] == 1.0 and control["exact_match"] == 1.0
    # The student's lead over the control is the difference of their rows, and it is clear: behind on
    # both, with intervals that stay on the losing side of 0.
    kl, top1 = outcome.control_sft_lead["kl"], outcome.control_sft_lead["top1_agreement"]
    assert kl.difference == pytest.approx(student["kl"] - control["kl"], rel=1e-9)
    assert top1.difference == pytest.approx(student["top1_agreement"] - 1.0, rel=1e-9)
    assert 0 < kl.low < kl.difference < kl.high
    assert top1.low <= top1.difference <= top1.high < 0
    document = json.loads(object_store.get_bytes("jobs/job-2/evaluate/report/report.json"))
    assert document["leads"] == {
        "control-sft": {metric: lead.model_dump() for metric, lead in outcome.control_sft_lead.items()}
    }
    assert list(document["metrics"]) == [
        "uniform",
        "unigram",
        "baseline",
        "control-sft",
        "student",
        "teacher",
    ]
    assert document["student"]["control_sft"] == "jobs/job-2/train/control-sft"
    # Side by side: the control (the teacher's weights) answers as the teacher did; the student is model
    # "a" and the untrained student model "b".
    _samples_in_holdout_order(object_store, outcome.samples)
    prompts = [sample.prompt for sample in outcome.samples]
    assert [sample.control_sft for sample in outcome.samples] == [
        sample.teacher for sample in outcome.samples
    ]
    assert [sample.student for sample in outcome.samples] == _greedy_answers(models["a"], prompts)
    assert [sample.baseline for sample in outcome.samples] == _greedy_answers(models["b"], prompts)
    assert document["samples"] == [sample.model_dump() for sample in outcome.samples]
    markdown = object_store.get_bytes("jobs/job-2/evaluate/report/report.md").decode()
    assert "| Metric | Uniform | Unigram | Untrained student | SFT control | Student | Teacher |" in markdown
    assert f"Against the SFT control, paired over the held-out answers: KL {kl.difference:+.3f}" in markdown
    # The published student's card tells it too.
    card = object_store.get_bytes(f"{outcome.student_prefix}/README.md").decode()
    assert f"Against the SFT control, paired over the held-out answers: KL {kl.difference:+.3f}" in card


def test_with_another_tokenizer_kl_and_top1_are_omitted(
    object_store: ObjectStore, models: dict[str, Path], holdout: str
):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    rows = list(read_answer_rows(object_store, holdout))
    prepared = evaluation.prepare_holdout(
        rows,
        answers_topk(object_store, holdout),
        tokenizer,
        "the student's vocabulary differs from the teacher's",
        max_seq_len=2048,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    assert not prepared.token_level
    assert any("KL and top-1 agreement are omitted" in note for note in prepared.notes)
    settings = EvaluationSettings(tokens_per_pass=256, generation_batch=4)
    figures = {
        name: evaluation.evaluate_model(
            models[name], tokenizer, prepared, torch.device("cpu"), settings, lambda _: None
        ).metrics
        for name in ("teacher", "a")
    }
    assert set(figures["teacher"]) - {"repeated_4grams"} == {"perplexity", "exact_match", "token_f1"}
    assert set(evaluation.teacher_metrics(prepared)) - {"repeated_4grams"} == {"perplexity"}
    # Across tokenizers a teacher answer cut for length is cut again in the student's tokens, which can
    # end it a token earlier or later: the teacher itself scores almost, not exactly, 1. (Model "a" stands
    # in for the reference here.)
    lead = headline(figures["a"], figures["teacher"], evaluation.teacher_metrics(prepared))
    assert lead.metric == "token_f1" and lead.percent > 80
