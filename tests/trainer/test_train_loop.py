"""The training loop on one worker (no Ray): a tiny random Llama student learns from the answers of a
different tiny random Llama teacher, both with SmolLM2's tokenizer, through a real object store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from stillhouse.common.datasets.artifacts import download_artifact, list_artifacts
from stillhouse.common.jobspec import StudentSpec
from stillhouse.trainer.run_config import (
    IncompatibleTokenizers,
    TrainingDataError,
    TrainingDiverged,
    TrainRun,
)
from stillhouse.trainer.train_loop import TrainingLoop, Workers, train_worker

DATASET = "jobs/job-1/teacher/train"
PROMPTS = [
    f"{question} {topic}"
    for question in ("tell me about", "write a poem about", "why do people like")
    for topic in ("cats", "the sea", "rain", "bread", "music", "trains")
]


@pytest.fixture
def models(tmp_path: Path, tiny_llama) -> tuple[Path, Path]:
    return tiny_llama(tmp_path / "teacher", seed=1), tiny_llama(tmp_path / "student", seed=0)


@pytest.fixture
def make_run(models, object_store, object_store_settings, answers_dataset):
    teacher, student = models
    answers_dataset(object_store, DATASET, teacher, PROMPTS, top_k=20, max_new_tokens=16)

    def make(output_prefix: str = "jobs/job-1/train", **training) -> TrainRun:
        return TrainRun.model_validate(
            {
                "job_id": "job-1",
                "answers_dataset_id": DATASET,
                "object_store": object_store_settings,
                "teacher": {"backend": "local", "model": str(teacher)},
                "student": {"init": {"pretrained": str(student)}},
                "training": {
                    "learningRate": 3e-3,
                    "batchTokens": 256,
                    "maxSeqLen": 128,
                    "warmupRatio": 0.1,
                    **training,
                },
                "output_prefix": output_prefix,
                "report_every_steps": 1,
            }
        )

    return make


def student_weights(store, prefix: str, folder: Path) -> dict[str, torch.Tensor]:
    download_artifact(store, prefix, folder)
    return load_file(folder / "model.safetensors")


# The SFT control's test trains with cross-entropy too, so `sft` here runs with the slow tests.
@pytest.mark.parametrize("kind", [pytest.param("sft", marks=pytest.mark.slow), "forward_kl"])
def test_loss_falls(make_run, kind):
    reports: list[dict[str, float]] = []
    # One answer per row, two rows per step: 9 steps per epoch.
    run = make_run(loss={"kind": kind}, epochs=3, maxSeqLen=64, batchTokens=128, checkpointEverySteps=1000)
    outcome = train_worker(run, reports.append)
    assert outcome.steps == len(reports) >= 25
    assert [report["step"] for report in reports] == list(range(1, outcome.steps + 1))
    first, last = (sum(report["loss"] for report in part) / 3 for part in (reports[:3], reports[-3:]))
    assert last < 0.6 * first
    assert reports[-1]["tokens"] == outcome.tokens
    assert reports[-1]["epoch"] == pytest.approx(3.0)
    # Warm-up, then decay to a tenth of the peak at the last step.
    assert reports[0]["learning_rate"] < reports[2]["learning_rate"] <= 3e-3
    assert reports[-1]["learning_rate"] == pytest.approx(3e-4)


def test_resumes_from_the_last_checkpoint_with_the_same_batches_and_weights(make_run, object_store, tmp_path):
    settings = {"loss": {"kind": "forward_kl"}, "epochs": 2, "checkpointEverySteps": 3}
    uninterrupted: list[dict[str, float]] = []
    outcome = train_worker(make_run("jobs/straight/train", **settings), uninterrupted.append)
    total = outcome.steps
    assert total >= 10

    crash_after = 7  # the last checkpoint before it is step 6
    interrupted: list[dict[str, float]] = []

    def crash(metrics: dict[str, float]) -> None:
        interrupted.append(metrics)
        if metrics["step"] == crash_after:
            raise RuntimeError("worker lost")

    run = make_run("jobs/resumed/train", **settings)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_worker(run, crash)
    committed = sorted(list_artifacts(object_store, f"{run.checkpoints_prefix}/"))
    assert len(committed) == 2 and committed[-1] == f"{run.checkpoints_prefix}/step-00000006"

    resumed: list[dict[str, float]] = []
    outcome = train_worker(run, resumed.append)
    assert outcome.resumed_from_step == 6
    assert outcome.steps == total
    # Its curve has every step, those before the crash too, as the uninterrupted run's has.
    curve = outcome.curve
    assert [point.step for point in curve] == list(range(1, total + 1))
    straight_losses = [report["loss"] for report in uninterrupted]
    assert [point.metrics["loss"] for point in curve] == pytest.approx(straight_losses, rel=1e-5)
    assert [report["step"] for report in resumed] == list(range(7, total + 1))
    # The same batches from the same step on: the same losses as the uninterrupted run.
    for again, straight in zip(resumed, uninterrupted[6:], strict=True):
        assert again["loss"] == pytest.approx(straight["loss"], rel=1e-5)
        assert again["tokens"] == straight["tokens"]
    expected = student_weights(object_store, "jobs/straight/train/student", tmp_path / "straight")
    actual = student_weights(object_store, run.student_prefix, tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)
    # A finished run keeps only its last checkpoint (two while it runs), from which a retried stage
    # resumes with nothing to do; the log covers every step, before and after the crash.
    final = f"{run.checkpoints_prefix}/step-{total:08d}"
    assert sorted(list_artifacts(object_store, f"{run.checkpoints_prefix}/")) == [final]
    straight_final = final.replace("jobs/resumed/", "jobs/straight/")
    assert sorted(list_artifacts(object_store, "jobs/straight/train/checkpoints/")) == [straight_final]
    retried: list[dict[str, float]] = []
    outcome = train_worker(run, retried.append)
    assert outcome.resumed_from_step == total and outcome.steps == total and retried == []
    assert outcome.curve == curve
    log_lines = (tmp_path / "resumed" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, total + 1))


def test_output_loads_with_plain_transformers(make_run, object_store, tmp_path, models):
    run = make_run(loss={"kind": "forward_kl"}, epochs=1, checkpointEverySteps=1000)
    reports: list[dict[str, float]] = []
    outcome = train_worker(run, reports.append)

    student = tmp_path / "trained"
    download_artifact(object_store, run.student_prefix, student)
    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert (
        model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1]
        == inputs["input_ids"].shape[1] + 3
    )
    log_lines = [json.loads(line) for line in (student / "training_log.jsonl").read_text().splitlines()]
    assert log_lines == reports and len(log_lines) == outcome.steps
    card = (student / "README.md").read_text()
    assert card.startswith("---\n") and DATASET in card

    # The baseline is the student before training.
    baseline = tmp_path / "untrained"
    download_artifact(object_store, run.baseline_prefix, baseline)
    untrained = AutoModelForCausalLM.from_pretrained(models[1]).state_dict()
    trained = model.state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(baseline).state_dict().items():
        assert torch.equal(tensor, untrained[name]), name
    assert not torch.equal(
        trained["model.layers.0.mlp.up_proj.weight"], untrained["model.layers.0.mlp.up_proj.weight"]
    )


def test_a_diverging_loss_stops_with_the_step(make_run, object_store):
    run = make_run(loss={"kind": "sft"}, learningRate=1e6, epochs=2, checkpointEverySteps=1000)
    reports: list[dict[str, float]] = []
    with pytest.raises(TrainingDiverged, match=r"at step \d+; lower training.learningRate") as raised:
        train_worker(run, reports.append)
    failed_step = int(str(raised.value).split("at step ")[1].split(";")[0])
    assert len(reports) == failed_step - 1
    assert not list_artifacts(object_store, run.student_prefix)


def test_nothing_left_to_train_on_is_a_clear_error(make_run):
    # SmolLM2's chat template adds a system prompt of about 30 tokens: no prompt fits in 16.
    with pytest.raises(
        TrainingDataError, match=r"no training examples at maxSeqLen=16: 18 rows read, 0 kept"
    ):
        train_worker(make_run(maxSeqLen=16), lambda metrics: None)


def test_full_teacher_logits_from_the_local_teacher(make_run):
    reports: list[dict[str, float]] = []
    run = make_run(
        loss={"kind": "forward_kl", "teacherLogits": "full"}, epochs=1, maxSeqLen=64, batchTokens=128
    )
    outcome = train_worker(run, reports.append)
    assert outcome.steps == len(reports) >= 5
    assert all(report["kd"] > 0 and report["loss"] == report["kd"] for report in reports)
    assert reports[-1]["loss"] < reports[0]["loss"]


@pytest.fixture
def word_level_student(tmp_path: Path) -> Path:
    """A tiny Llama with a vocabulary of its own (whole words), so not the teacher's."""
    names = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"] + [
        f"w{i}" for i in range(93)
    ]
    word_level = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(names),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=None,
    )
    folder = tmp_path / "word-level-student"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_logit_losses_need_the_teachers_vocabulary(make_run, word_level_student):
    def run_with(**loss) -> TrainRun:
        run = make_run(loss={"kind": "forward_kl", **loss}, epochs=1)
        return run.model_copy(
            update={"student": StudentSpec.model_validate({"init": {"pretrained": str(word_level_student)}})}
        )

    with pytest.raises(IncompatibleTokenizers, match=r"forward_kl.*vocabulary .*fallbackToSft"):
        train_worker(run_with(), lambda metrics: None)
    reports: list[dict[str, float]] = []
    outcome = train_worker(run_with(fallbackToSft=True), reports.append)
    assert outcome.steps >= 1
    assert all(report["fell_back_to_sft"] == 1.0 and report["kd"] == 0 for report in reports)


def test_a_run_survives_a_round_trip_through_json(make_run):
    run = make_run(loss={"kind": "jsd", "beta": 0.3, "ceWeight": 0.2}, learningRate=1e-4)
    assert TrainRun.model_validate_json(run.model_dump_json()) == run
    assert TrainRun.model_validate(run.model_dump(mode="json")) == run
    assert run.student_prefix == "jobs/job-1/train/student"


# --- on-policy distillation ----------------------------------------------------------------------------


@torch.no_grad()
def greedy_response(model, prompt_ids: list[int], new_tokens: int, stop: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == stop:
            break
    return ids[len(prompt_ids) :]


def test_on_policy_steps_train_on_the_students_own_generations(make_run, object_store, models, tmp_path):
    run = make_run(
        loss={"kind": "reverse_kl"},
        onPolicy={"fraction": 1.0, "maxNewTokens": 3, "temperature": 0.0},
        epochs=1,
        maxSeqLen=64,
        batchTokens=128,
    )
    reports: list[dict] = []
    outcome = train_worker(run, reports.append)
    assert outcome.on_policy_steps == outcome.steps == len(reports) >= 5
    assert all(report["on_policy"] == 1.0 and report["model"] == "student" for report in reports)
    # ceWeight does not apply to generated tokens: the loss is the divergence from the teacher alone.
    assert all(report["kd"] > 0 and report["loss"] == report["kd"] for report in reports)

    # The first step trained on the untrained student's greedy continuations of its prompts: its
    # positions are those of prompt + at most 3 generated tokens (the teacher's answers are 16 long).
    loop = TrainingLoop.for_student(run, lambda metrics: None, Workers.current(), object_store, tmp_path)
    student = AutoModelForCausalLM.from_pretrained(models[1]).eval()
    step_examples = next(loop.data.steps(0, loop.plan)).examples
    eos = loop.tokenizer.eos_token_id
    positions = [
        len(example.prompt_ids) + len(greedy_response(student, example.prompt_ids, 3, eos)) - 1
        for example in step_examples
    ]
    teacher_text_positions = sum(example.positions for example in step_examples)
    assert reports[0]["tokens"] == sum(positions) < teacher_text_positions


@pytest.mark.slow
def test_on_policy_share_follows_the_fraction_and_survives_a_resume(make_run):
    settings = {
        "loss": {"kind": "forward_kl"},
        "onPolicy": {"fraction": 0.5, "maxNewTokens": 4, "temperature": 1.0},
        "epochs": 1,
        "maxSeqLen": 64,
        "batchTokens": 128,
        "checkpointEverySteps": 3,
    }
    uninterrupted: list[dict] = []
    outcome = train_worker(make_run("jobs/straight/train", **settings), uninterrupted.append)
    flags = [report["on_policy"] for report in uninterrupted]
    assert outcome.on_policy_steps == sum(flags) and set(flags) == {0.0, 1.0}
    assert int(0.5 * outcome.steps) <= outcome.on_policy_steps <= -(-outcome.steps // 2)

    def crash(metrics: dict) -> None:
        if metrics["step"] == 5:
            raise RuntimeError("worker lost")

    run = make_run("jobs/resumed/train", **settings)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_worker(run, crash)
    resumed: list[dict] = []
    again = train_worker(run, resumed.append)
    assert again.resumed_from_step == 3 and again.on_policy_steps == outcome.on_policy_steps
    # The same steps on-policy, the same sampled generations (their token counts), the same losses.
    for report, straight in zip(resumed, uninterrupted[3:], strict=True):
        assert report["on_policy"] == straight["on_policy"]
        assert report["tokens"] == straight["tokens"]
        assert report["loss"] == pytest.approx(straight["loss"], rel=1e-5)


# --- the SFT control -----------------------------------------------------------------------------------


def test_the_sft_control_trains_on_the_same_batches_with_cross_entropy(make_run, object_store, tmp_path):
    run = make_run(
        loss={"kind": "forward_kl"},
        onPolicy={"fraction": 0.5, "maxNewTokens": 4, "temperature": 0.0},
        epochs=1,
        maxSeqLen=64,
        batchTokens=128,
        checkpointEverySteps=3,
    ).model_copy(update={"controls": ["sft"]})

    def crash(metrics: dict) -> None:
        if metrics["model"] == "control-sft" and metrics["step"] == 5:
            raise RuntimeError("worker lost")

    first: list[dict] = []
    with pytest.raises(RuntimeError, match="worker lost"):
        train_worker(run, lambda metrics: (first.append(metrics), crash(metrics)))
    student_reports = [report for report in first if report["model"] == "student"]
    assert len(student_reports) >= 5 and first[: len(student_reports)] == student_reports

    # The restart does not train the student again: the control carries on from its checkpoint.
    resumed: list[dict] = []
    outcome = train_worker(run, resumed.append)
    assert [report["step"] for report in resumed] == list(range(4, outcome.steps + 1))
    assert {report["model"] for report in resumed} == {"control-sft"}
    control = outcome.controls["sft"]
    assert control.resumed_from_step == 3 and control.on_policy_steps == 0
    assert control.steps == outcome.steps and outcome.on_policy_steps > 0

    control_log = [report for report in first if report["model"] == "control-sft"][:3] + resumed
    assert all(report["kd"] == 0 and report["loss"] == report["ce"] for report in control_log)
    assert all("on_policy" not in report for report in control_log)
    # The same batches: the same tokens a step as the student's steps on the teacher's answers.
    student_tokens = [report["tokens"] for report in student_reports]
    control_tokens = [report["tokens"] for report in control_log]
    for index, report in enumerate(student_reports):
        if report["on_policy"] == 0.0:
            before = student_tokens[index - 1] if index else 0
            control_before = control_tokens[index - 1] if index else 0
            assert control_tokens[index] - control_before == report["tokens"] - before

    folder = tmp_path / "control"
    download_artifact(object_store, run.sft_control_prefix, folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert "| Kind | `sft` |" in (folder / "README.md").read_text()
    logged = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == list(range(1, control.steps + 1))
    trained = load_file(folder / "model.safetensors")
    student = student_weights(object_store, run.student_prefix, tmp_path / "trained-student")
    untrained = student_weights(object_store, run.baseline_prefix, tmp_path / "baseline")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[name], student[name]) and not torch.equal(trained[name], untrained[name])


def test_a_pruned_student_keeps_the_teacher_layers_and_channels_that_change_its_hidden_states(
    tmp_path, tiny_llama, object_store, object_store_settings, answers_dataset
):
    """Teacher layer 2 adds nothing to the residual stream: ranked on the training answers, it is the
    layer a 3-of-4 student drops, and the model card says which layers the student kept. The first half
    of layer 3's MLP channels add nothing either: the student, cut to half the MLP width, drops them."""
    teacher = tiny_llama(tmp_path / "teacher", layers=4, seed=1)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight[:, :64].zero_()
    model.save_pretrained(teacher)
    answers_dataset(object_store, DATASET, teacher, PROMPTS[:6], top_k=5, max_new_tokens=8)
    run = TrainRun.model_validate(
        {
            "job_id": "job-1",
            "answers_dataset_id": DATASET,
            "object_store": object_store_settings,
            "teacher": {"backend": "local", "model": str(teacher)},
            "student": {"init": {"pruneTeacherDepth": 3, "pruneTeacherWidth": 0.5}},
            "training": {"epochs": 1, "batchTokens": 256, "maxSeqLen": 128},
            "output_prefix": "jobs/job-1/train",
        }
    )
    train_worker(run, lambda figures: None)

    download_artifact(object_store, run.baseline_prefix, tmp_path / "baseline")
    baseline = AutoModelForCausalLM.from_pretrained(tmp_path / "baseline")
    assert baseline.config.num_hidden_layers == 3 and baseline.config.intermediate_size == 64
    torch.testing.assert_close(
        baseline.model.layers[2].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight[64:]
    )
    for student_index, teacher_index in enumerate([0, 1]):
        kept_rows = baseline.model.layers[student_index].mlp.up_proj.weight
        teacher_rows = model.model.layers[teacher_index].mlp.up_proj.weight
        assert all((teacher_rows == row).all(dim=1).any() for row in kept_rows)
    download_artifact(object_store, run.student_prefix, tmp_path / "student")
    card = (tmp_path / "student" / "README.md").read_text()
    assert "| Teacher layers kept | `[0, 1, 3]` |" in card
