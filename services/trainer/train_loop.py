"""The training loop one worker runs: a plain PyTorch loop, the same on one CPU and on many GPUs.

`train_worker` knows nothing of Ray. When torch.distributed is initialised (Ray Train's TorchTrainer
does that before it calls the train function), each worker streams its own part of the answers dataset
(`worker_data.WorkerData`) and the model is wrapped in DistributedDataParallel, or sharded with FSDP
(`fully_shard`, per decoder layer) for strategy `fsdp`; otherwise it trains alone. DDP is tested on
the CPU (gloo); FSDP is meant for GPUs (NCCL) and is not tested on the CPU, where gloo may not support it.

One optimizer step: `batchTokens` tokens over all workers, as packed rows of `maxSeqLen`, in
micro-batches whose gradients accumulate. The loss is the mean over every labelled token of the step on
every worker: each micro-batch's mean is weighted by its share of the step's labelled tokens. The
model's own forward computes logits only at labelled positions (`student_logits`). AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up over `warmupRatio` of the steps,
then cosine decay to a tenth of the peak learning rate; gradients clipped to norm 1. The forward pass
runs in `training.precision` (`precision`: bf16 autocast over float32 master weights on a GPU and on a
CPU with AMX or AVX512-BF16); on a GPU with gradient checkpointing.

With `training.onPolicy`, a share of the steps trains on the student's own generations of the step's
prompts, scored by the local teacher's full logits (`on_policy`); the others train as above. The
training log marks each step's kind (`on_policy`: 1.0 or 0.0), and the outcome counts the on-policy steps.

Rank 0 writes the baseline artifact (the untrained student) before the first step, a checkpoint every
`checkpointEverySteps` steps and at the end of every epoch, and finally the student artifact. A run that
finds a committed checkpoint resumes from it: same weights, optimizer, scheduler, random states, and the
same batches from the same step on.

Controls (`TrainRun.controls`, from evaluation.controls): after the student, the same loop trains the SFT
control (`Trainee`): the baseline's weights, the same examples, batches, steps and schedule, loss `sft`,
no on-policy steps; its own checkpoints, its artifact at `TrainRun.sft_control_prefix`. A restart after
the student finished resumes the student from its last checkpoint (the end: nothing is retrained) and
goes on with the control. Every progress report names the model it is about (`model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.datasets.artifacts import MANIFEST_NAME, download_artifact, upload_folder
from stillhouse.common.jobspec import (
    LossKind,
    LossSpec,
    OnPolicySpec,
    StudentInit,
    TeacherBackend,
    TeacherSpec,
    TrainingSpec,
    TrainingStrategy,
)
from stillhouse.common.models import model_loading
from stillhouse.common.models.generation import default_stop_ids
from stillhouse.common.models.locator import Locate, ModelLocator
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer import checkpoints
from stillhouse.trainer.calibration import CalibrationText
from stillhouse.trainer.channel_importance import ChannelRanking
from stillhouse.trainer.checkpoints import Checkpoint, TrainingPosition
from stillhouse.trainer.data import (
    IGNORE_INDEX,
    BatchPlan,
    DataCounts,
    PackedBatch,
    StepBatch,
    TokenizedAnswer,
    answers_topk,
    collate,
    pack_rows,
    read_answer_rows,
)
from stillhouse.trainer.layer_influence import LayerChoice
from stillhouse.trainer.losses import SparseTeacher, distillation_loss
from stillhouse.trainer.model_card import model_card
from stillhouse.trainer.on_policy import (
    generate_responses,
    is_on_policy_step,
    on_policy_loss,
    on_policy_steps,
)
from stillhouse.trainer.precision import autocast, autocast_dtype, precision_label
from stillhouse.trainer.run_config import (
    IncompatibleTokenizers,
    TrainingDataError,
    TrainingDiverged,
    TrainingError,
    TrainOutcome,
    TrainRun,
    UnsupportedArchitecture,
)
from stillhouse.trainer.student_init import build_student, check_tokenizers, teacher_tokenizer
from stillhouse.trainer.student_logits import decoder_layers, labelled_logits, unsupported_architecture
from stillhouse.trainer.training_curve import training_curve
from stillhouse.trainer.worker_data import WorkerData

log = structlog.get_logger(__name__)

ADAMW_BETAS = (0.9, 0.95)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
WEIGHT_DECAY = 0.1
GRADIENT_CLIP_NORM = 1.0
FINAL_LEARNING_RATE_FRACTION = 0.1

# A progress record: figures, and `model` (the name of the model being trained).
Report = Callable[[dict[str, Any]], None]

STUDENT = "student"
SFT_CONTROL = "control-sft"


# --- the run's pieces, each a plain function -----------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """This process's place among the workers, and the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> Workers:
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(0, 1, device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM if self.distributed else None)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX if self.distributed else None)

    def min(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MIN if self.distributed else None)

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if op is None:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@dataclass(frozen=True)
class LossChoice:
    spec: LossSpec  # the loss actually trained with
    use_teacher_tokens: bool  # the student reads the teacher's token ids (same vocabulary)
    fallback_reason: str | None  # why a logit loss fell back to sft, if it did

    @property
    def stored_teacher(self) -> bool:
        return self.spec.kind is not LossKind.SFT and self.spec.teacher_logits == "stored"

    @property
    def full_teacher(self) -> bool:
        return self.spec.kind is not LossKind.SFT and self.spec.teacher_logits == "full"


def choose_loss(
    loss: LossSpec, teacher: TeacherSpec, student_tokenizer: PreTrainedTokenizerBase, locate: Locate
) -> LossChoice:
    """Logit losses compare distributions token by token, so they need the student to share the teacher's
    vocabulary; `sft` does not (it reads the response text when the vocabularies differ)."""
    teachers_tokenizer = teacher_tokenizer(teacher, locate)
    if teachers_tokenizer is None:
        reason = (
            "the teacher's tokenizer is unknown (an `openai` teacher without teacher.tokenizer), so the "
            "vocabularies cannot be compared"
        )
    else:
        reason = check_tokenizers(student_tokenizer, teachers_tokenizer)
    if reason is None:
        return LossChoice(loss, True, None)
    if loss.kind is LossKind.SFT:
        return LossChoice(loss, False, None)
    if loss.fallback_to_sft:
        log.warning("loss falls back to sft", requested=loss.kind.value, reason=reason)
        return LossChoice(loss.model_copy(update={"kind": LossKind.SFT}), False, reason)
    raise IncompatibleTokenizers(
        f"training.loss.kind `{loss.kind.value}` compares the student's and the teacher's token "
        f"distributions, but {reason}. Give the student the teacher's tokenizer (e.g. student.init "
        "pruneTeacherDepth or config), use kind `sft`, or set training.loss.fallbackToSft"
    )


@dataclass(frozen=True)
class Trainee:
    """The model a `TrainingLoop` trains: how, where its checkpoints go, and where its artifact goes."""

    name: str  # STUDENT or a control's (SFT_CONTROL); progress reports carry it as `model`
    choice: LossChoice
    on_policy: OnPolicySpec | None
    training: TrainingSpec  # the training as the model card tells it
    artifact_prefix: str
    checkpoints_prefix: str
    baseline_prefix: str | None  # where the untrained model is committed before the first step, if anywhere

    @classmethod
    def student(cls, run: TrainRun, choice: LossChoice) -> Trainee:
        # A logit loss that fell back to sft has no teacher distribution to score generations with.
        on_policy = run.training.on_policy if choice.spec.kind is not LossKind.SFT else None
        return cls(
            STUDENT,
            choice,
            on_policy,
            run.training,
            run.student_prefix,
            run.checkpoints_prefix,
            run.baseline_prefix,
        )

    @classmethod
    def sft_control(cls, run: TrainRun, student: LossChoice) -> Trainee:
        """Reads the same tokens as the student (the teacher's ids when the student does), with
        cross-entropy alone."""
        loss = run.training.loss.model_copy(update={"kind": LossKind.SFT})
        return cls(
            SFT_CONTROL,
            LossChoice(loss, student.use_teacher_tokens, None),
            None,
            run.training.model_copy(update={"loss": loss, "on_policy": None}),
            run.sft_control_prefix,
            run.sft_control_checkpoints_prefix,
            None,
        )


def check_on_policy(run: TrainRun, workers: Workers) -> None:
    if (
        run.training.on_policy is not None
        and workers.distributed
        and run.training.strategy is TrainingStrategy.FSDP
    ):
        raise TrainingError(
            "training.onPolicy generates with the whole student on every worker, which strategy `fsdp` "
            "shards: use training.strategy `ddp`, or one worker"
        )


def artifact_fetcher(settings: ObjectStoreSettings, folder: Path) -> Locate:
    """`locate` for `build_student` from a committed artifact of this platform: downloads an
    `s3://<bucket>/<prefix>` artifact into `folder`, checking every file against its manifest."""

    def fetch(reference: str, field: str) -> str:
        if not reference.startswith("s3://"):
            raise ValueError(f"{reference!r} is not an s3://<bucket>/<prefix> reference")
        bucket, _, prefix = reference.removeprefix("s3://").partition("/")
        store = open_object_store(settings.model_copy(update={"bucket": bucket}))
        destination = folder / hashlib.sha256(reference.encode()).hexdigest()[:16]
        if not destination.exists():
            download_artifact(store, prefix.rstrip("/"), destination)
        return str(destination)

    return fetch


def load_examples(
    store: ObjectStore,
    run: TrainRun,
    tokenizer: PreTrainedTokenizerBase,
    choice: LossChoice,
    workers: Workers,
    work_dir: Path,
) -> WorkerData:
    """This worker's examples, streamed (`WorkerData`), with every worker's counts. Every worker learns
    the others' counts, so that a worker left with nothing fails together with the rest instead of
    leaving them waiting."""
    if choice.stored_teacher and answers_topk(store, run.answers_dataset_id) == 0:
        raise TrainingDataError(
            f"training.loss.kind `{choice.spec.kind.value}` with teacherLogits `stored` needs the teacher's "
            f"logprobs, but dataset {run.answers_dataset_id!r} has none (teacher.topLogprobs was 0)"
        )
    data = WorkerData.load(
        store,
        run.answers_dataset_id,
        tokenizer,
        rank=workers.rank,
        world=workers.world,
        use_teacher_tokens=choice.use_teacher_tokens,
        require_teacher=choice.stored_teacher,
        max_seq_len=run.training.max_seq_len,
        seed=run.training.seed,
        work_dir=work_dir / "training-data",
        shuffle_buffer=run.shuffle_buffer_examples,
    )
    totals = DataCounts(*(int(value) for value in workers.sum(list(vars(data.counts).values()))))
    fewest = int(workers.min([data.examples_per_epoch])[0])
    if totals.kept == 0:
        raise TrainingDataError(
            f"dataset {run.answers_dataset_id!r} leaves no training examples at maxSeqLen="
            f"{run.training.max_seq_len}: {totals.describe()}"
        )
    if fewest == 0:
        raise TrainingDataError(
            f"dataset {run.answers_dataset_id!r} has {totals.kept} usable examples, too few for "
            f"{workers.world} workers (one would get none): use fewer workers"
        )
    return data.with_counts(totals)


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up, then
    cosine decay to FINAL_LEARNING_RATE_FRACTION at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return FINAL_LEARNING_RATE_FRACTION + (1 - FINAL_LEARNING_RATE_FRACTION) * cosine


def make_optimizer(model: nn.Module, learning_rate: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear layers, embeddings) only, not on norms and biases. The
    fused kernel also on a CPU, where it updates the demo's 81M-parameter student in 0.04 s against 0.30 s
    for the per-parameter loop."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=learning_rate, betas=ADAMW_BETAS, fused=device.type in FUSED_ADAMW_DEVICES
    )


def wrap_model(model: PreTrainedModel, strategy: TrainingStrategy, workers: Workers) -> nn.Module:
    if not workers.distributed:
        return model
    if strategy is TrainingStrategy.FSDP:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [workers.device] if workers.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the all-reduce of gradients on the micro-batches before the last one of a step."""
    if enabled:
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # sharded with fully_shard
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def load_full_teacher(teacher: TeacherSpec, device: torch.device, locate: Locate) -> PreTrainedModel:
    if teacher.backend is not TeacherBackend.LOCAL:
        raise TrainingDataError("training.loss.teacherLogits `full` needs a `local` teacher")
    source = model_loading.resolve_model_reference(locate(teacher.model, "teacher.model"))
    model = model_loading.load_scoring_model(source, device, teacher.precision)
    require_supported_architecture(model, "teacher.model")
    model.requires_grad_(False)
    return model


def require_supported_architecture(model: PreTrainedModel, field: str) -> None:
    reason = unsupported_architecture(model.config.model_type)
    if reason is not None:
        raise UnsupportedArchitecture(f"{field}: {reason}")


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The model in Hugging Face format (safetensors) with its tokenizer: `from_pretrained(folder)` loads
    it with nothing but transformers."""
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder


def artifact_committed(store: ObjectStore, prefix: str) -> bool:
    return store.exists(f"{prefix}/{MANIFEST_NAME}")


# --- the loop ------------------------------------------------------------------------------------------


@dataclass
class TrainingLoop:
    """One worker's run, from a built model to its committed artifact. `teacher_layers`: the teacher's
    decoder layers a depth-pruned student started from."""

    run: TrainRun
    report: Report
    workers: Workers
    store: ObjectStore
    work_dir: Path
    trainee: Trainee
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: WorkerData
    teacher_layers: list[int] | None = None
    choice: LossChoice = field(init=False)
    plan: BatchPlan = field(init=False)
    teacher_k: int | None = field(init=False)
    # Steps of each epoch: the most any worker needs (see worker_data).
    steps_per_epoch: list[int] = field(init=False)
    total_steps: int = field(init=False)
    warmup_steps: int = field(init=False)
    report_interval: int = field(init=False)
    training_log: list[dict[str, Any]] = field(default_factory=list, init=False)
    pad_token_id: int = field(init=False)
    autocast_dtype: torch.dtype | None = field(init=False)

    def __post_init__(self) -> None:
        run, workers = self.run, self.workers
        training = run.training
        self.choice = self.trainee.choice
        self.plan = BatchPlan.create(
            training.batch_tokens, training.max_seq_len, workers.world, run.micro_batch_tokens
        )
        self.teacher_k = self._teacher_k()
        self.steps_per_epoch = [
            int(steps)
            for steps in workers.max(
                [
                    self.plan.steps_per_epoch(self.data.packed_row_count(epoch))
                    for epoch in range(training.epochs)
                ]
            )
        ]
        self.total_steps = sum(self.steps_per_epoch)
        self.warmup_steps = math.ceil(training.warmup_ratio * self.total_steps)
        self.report_interval = run.report_every_steps or max(1, self.total_steps // 100)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.autocast_dtype = autocast_dtype(training.precision, workers.device)

    @classmethod
    def for_student(
        cls, run: TrainRun, report: Report, workers: Workers, store: ObjectStore, work_dir: Path
    ) -> TrainingLoop:
        check_on_policy(run, workers)
        calibration = CalibrationText(
            read_answer_rows(store, run.answers_dataset_id),
            run.training.max_seq_len,
            worker=workers.rank,
            workers=workers.world,
        )
        layers = LayerChoice(run.student.init.layer_selection, calibration, workers.sum)
        locate = ModelLocator(run.models, run.object_store).locate
        model, tokenizer = build_student(
            run.student.init,
            run.teacher,
            locate,
            choose_layers=layers,
            rank_channels=ChannelRanking(calibration, workers.sum),
        )
        require_supported_architecture(model, "student")
        choice = choose_loss(run.training.loss, run.teacher, tokenizer, locate)
        data = load_examples(store, run, tokenizer, choice, workers, work_dir)
        trainee = Trainee.student(run, choice)
        return cls(
            run, report, workers, store, work_dir / STUDENT, trainee, model, tokenizer, data, layers.kept
        )

    def sft_control(self) -> TrainingLoop:
        """The SFT control's loop, once this (the student's) has committed its baseline: the baseline's
        weights, this loop's examples (so the same batches), loss `sft`."""
        baseline = f"s3://{self.run.object_store.bucket}/{self.run.baseline_prefix}"
        fetch = artifact_fetcher(self.run.object_store, self.work_dir.parent / "fetched")
        model, _ = build_student(StudentInit(pretrained=baseline), self.run.teacher, fetch)
        trainee = Trainee.sft_control(self.run, self.choice)
        return replace(self, work_dir=self.work_dir.parent / SFT_CONTROL, trainee=trainee, model=model)

    def _teacher_k(self) -> int | None:
        if not self.choice.stored_teacher:
            return None
        return answers_topk(self.store, self.run.answers_dataset_id)

    def train(self) -> TrainOutcome:
        trainee = self.trainee
        resume_step = self.workers.broadcast(checkpoints.latest_step(self.store, trainee.checkpoints_prefix))
        if resume_step is None:
            self._commit_baseline()
        session = self._start_session()
        position = TrainingPosition(step=0, epoch=0, batch_in_epoch=0, tokens=0)
        if resume_step is not None:
            position = self._resume(resume_step, session)
        started = time.perf_counter()
        window = _Window()
        for epoch in range(position.epoch, self.run.training.epochs):
            first_batch = position.batch_in_epoch if epoch == position.epoch else 0
            steps = self.data.steps(epoch, self.plan, first_batch)
            for batch_index, step_batch in zip(
                range(first_batch, self.steps_per_epoch[epoch]), steps, strict=False
            ):
                position, window = self._advance(session, position, epoch, batch_index, step_batch, window)
        final_state = self._full_model_state(session.wrapped)
        seconds = time.perf_counter() - started
        final_metrics = self.training_log[-1] if self.training_log else {}
        if self.workers.rank == 0 and not artifact_committed(self.store, trainee.artifact_prefix):
            self._upload_trained(final_state, position, seconds)
        self.workers.barrier()
        figures = {name: value for name, value in final_metrics.items() if name != "model"}
        return TrainOutcome(
            steps=position.step,
            tokens=position.tokens,
            seconds=seconds,
            final_metrics={**figures, **self.data.counts.as_metrics()},
            resumed_from_step=resume_step,
            on_policy_steps=self._on_policy_steps(position.step),
            curve=training_curve(self.training_log),
        )

    def _commit_baseline(self) -> None:
        """The student as it starts, for the evaluation's baseline: committed once, by rank 0."""
        prefix = self.trainee.baseline_prefix
        if self.workers.rank == 0 and prefix is not None and not artifact_committed(self.store, prefix):
            self._upload_model(prefix, "baseline", self.model)

    def _start_session(self) -> _Session:
        """The model on its device, wrapped for the strategy, with its optimizer, schedule and teacher."""
        run, device = self.run, self.workers.device
        self.model.to(device)
        on_gpu = device.type == "cuda"
        if run.gradient_checkpointing if run.gradient_checkpointing is not None else on_gpu:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        wrapped = wrap_model(self.model, run.training.strategy, self.workers)
        optimizer = make_optimizer(wrapped, run.training.learning_rate, device)
        return _Session(
            wrapped=wrapped,
            forward=torch.compile(wrapped) if run.compile_model and on_gpu else wrapped,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: learning_rate_factor(step, self.warmup_steps, self.total_steps)
            ),
            teacher_model=(
                load_full_teacher(run.teacher, device, ModelLocator(run.models, run.object_store).locate)
                if self.choice.full_teacher or self.trainee.on_policy is not None
                else None
            ),
        )

    def _advance(
        self,
        session: _Session,
        position: TrainingPosition,
        epoch: int,
        batch_index: int,
        step_batch: StepBatch,
        window: _Window,
    ) -> tuple[TrainingPosition, _Window]:
        """One step from `position`, reported and checkpointed when due; the position after it and the
        report window."""
        training, on_policy_spec = self.run.training, self.trainee.on_policy
        step_started = time.perf_counter()
        on_policy = on_policy_spec is not None and is_on_policy_step(
            training.seed, position.step, on_policy_spec.fraction
        )
        micro_batches = self._micro_batches(position.step, step_batch, on_policy)
        loss = on_policy_loss(self.choice.spec) if on_policy else self.choice.spec
        teacher = session.teacher_model if on_policy or self.choice.full_teacher else None
        figures = self._step(position.step, session, micro_batches, teacher, loss, own_tokens=on_policy)
        figures["on_policy"] = float(on_policy)
        session.scheduler.step()
        last_of_epoch = batch_index + 1 == self.steps_per_epoch[epoch]
        position = TrainingPosition(
            step=position.step + 1,
            epoch=epoch + 1 if last_of_epoch else epoch,
            batch_in_epoch=0 if last_of_epoch else batch_index + 1,
            tokens=position.tokens + int(figures["tokens"]),
        )
        window.add(int(figures["tokens"]), time.perf_counter() - step_started)
        if position.step % self.report_interval == 0 or position.step == self.total_steps:
            self._report(position, epoch, batch_index, figures, session.optimizer, window)
            window = _Window()
        if position.step % training.checkpoint_every_steps == 0 or last_of_epoch:
            self._checkpoint(position, session)
        return position, window

    def _on_policy_steps(self, steps: int) -> int:
        on_policy = self.trainee.on_policy
        return 0 if on_policy is None else on_policy_steps(self.run.training.seed, steps, on_policy.fraction)

    def _micro_batches(self, step: int, step_batch: StepBatch, on_policy: bool) -> list[PackedBatch]:
        """The step's micro-batches: its examples as they are, or with the student's own responses."""
        examples, micro_batches, teacher_k = step_batch.examples, step_batch.micro_batches, self.teacher_k
        if on_policy:
            examples, teacher_k = self._generate(step, examples), None
            packed = pack_rows(examples, range(len(examples)), self.run.training.max_seq_len)
            size = self.plan.micro_batch_rows
            micro_batches = [packed[start : start + size] for start in range(0, len(packed), size)]
        return [
            collate(
                examples,
                micro_rows,
                pad_token_id=self.pad_token_id,
                teacher_k=teacher_k,
                length=self.run.training.max_seq_len if self.run.compile_model else None,
            )
            for micro_rows in micro_batches
        ]

    def _generate(self, step: int, prompts: list[TokenizedAnswer]) -> list[TokenizedAnswer]:
        """The step's examples, each with the student's own response to its prompt."""
        assert self.trainee.on_policy is not None
        self.model.eval()
        with self._autocast():
            generated = generate_responses(
                self.model,
                prompts,
                self.trainee.on_policy,
                stop_token_ids=default_stop_ids(self.model, self.tokenizer),
                pad_token_id=self.pad_token_id,
                max_seq_len=self.run.training.max_seq_len,
                seed=[self.run.training.seed, step, self.workers.rank],
            )
        self.model.train()
        return generated

    def _step(
        self,
        step: int,
        session: _Session,
        micro_batches: list[PackedBatch],
        teacher_model: PreTrainedModel | None,
        loss_spec: LossSpec,
        *,
        own_tokens: bool,
    ) -> dict[str, float]:
        """One optimizer step over the micro-batches; the step's figures over every worker. `own_tokens`:
        the labels are the student's own generations."""
        workers, device = self.workers, self.workers.device
        forward, wrapped, optimizer = session.forward, session.wrapped, session.optimizer
        label_tokens, tokens = workers.sum(
            [sum(batch.label_tokens for batch in micro_batches), sum(batch.tokens for batch in micro_batches)]
        )
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for index, batch in enumerate(micro_batches):
            batch = batch.to(device)
            with gradient_sync(wrapped, enabled=index == len(micro_batches) - 1), self._autocast():
                labelled = batch.labels != IGNORE_INDEX
                logits = labelled_logits(forward, batch.input_ids, batch.position_ids, labelled)
                breakdown = distillation_loss(
                    logits,
                    batch.labels[labelled].unsqueeze(0),
                    loss_spec,
                    self._teacher_signal(batch, labelled, teacher_model),
                    answers=batch.answer_ids()[labelled].unsqueeze(0),
                    own_tokens=own_tokens,
                )
                # Workers' gradients are averaged, so each worker's share is scaled by the world size.
                weight = breakdown.tokens * workers.world / label_tokens
                (breakdown.loss * weight).backward()
            sums += (
                torch.stack([breakdown.loss, breakdown.kd, breakdown.ce]).detach().double() * breakdown.tokens
            )
        loss, kd, ce = (value / label_tokens for value in workers.sum(sums.tolist()))
        learning_rate = optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {step + 1}; lower training.learningRate (now "
                f"{self.run.training.learning_rate:g}) or check the data"
            )
        gradient_norm = float(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), GRADIENT_CLIP_NORM))
        if not math.isfinite(gradient_norm):
            raise TrainingDiverged(
                f"gradients became {gradient_norm} at step {step + 1}; lower training.learningRate (now "
                f"{self.run.training.learning_rate:g})"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss,
            "kd": kd,
            "ce": ce,
            "learning_rate": learning_rate,
            "gradient_norm": gradient_norm,
            "tokens": tokens,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.workers.device, self.autocast_dtype)

    def _teacher_signal(
        self, batch: PackedBatch, labelled: torch.Tensor, teacher_model: PreTrainedModel | None
    ) -> SparseTeacher | torch.Tensor | None:
        """The teacher at the labelled positions, shaped like the student's logits: [1, N, ...]."""
        if teacher_model is not None:
            with torch.no_grad():
                return labelled_logits(teacher_model, batch.input_ids, batch.position_ids, labelled)
        if batch.teacher_ids is None:
            return None
        return SparseTeacher(
            batch.teacher_ids[labelled].unsqueeze(0),
            batch.teacher_logprobs[labelled].unsqueeze(0),
            batch.teacher_tail[labelled].unsqueeze(0),
        )

    def _report(
        self,
        position: TrainingPosition,
        epoch: int,
        batch_index: int,
        figures: dict[str, float],
        optimizer: torch.optim.Optimizer,
        window: _Window,
    ) -> None:
        # Every worker reports the same figures (they are sums over all workers).
        metrics: dict[str, Any] = {
            "model": self.trainee.name,
            "step": float(position.step),
            "loss": figures["loss"],
            "kd": figures["kd"],
            "ce": figures["ce"],
            "learning_rate": figures["learning_rate"],
            "gradient_norm": figures["gradient_norm"],
            "tokens": float(position.tokens),
            "tokens_per_second": window.tokens_per_second,
            "epoch": epoch + (batch_index + 1) / self.steps_per_epoch[epoch],
        }
        if self.trainee.on_policy is not None:
            metrics["on_policy"] = figures["on_policy"]
        if self.choice.fallback_reason is not None:
            metrics["fell_back_to_sft"] = 1.0
        self.training_log.append(metrics)
        self.report(metrics)

    def _full_model_state(self, wrapped: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _checkpoint(self, position: TrainingPosition, session: _Session) -> None:
        model_state, optimizer_state = get_state_dict(
            session.wrapped,
            session.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        rng_states = self.workers.gather(checkpoints.rng_state())
        if self.workers.rank == 0:
            checkpoint = Checkpoint(
                position,
                model_state,
                optimizer_state,
                session.scheduler.state_dict(),
                rng_states,
                self.training_log,
            )
            prefix = checkpoints.save_checkpoint(
                self.store,
                self.trainee.checkpoints_prefix,
                checkpoint,
                self.work_dir,
                # Once the last step is saved, the earlier checkpoints are of no use (a retried stage
                # resumes at the end); each holds the weights and optimizer state again (0.9 GB for the
                # demo's student).
                keep=1 if position.step == self.total_steps else self.run.keep_checkpoints,
            )
            log.info("checkpoint committed", prefix=prefix, step=position.step)

    def _resume(self, step: int, session: _Session) -> TrainingPosition:
        checkpoint = checkpoints.load_checkpoint(
            self.store, self.trainee.checkpoints_prefix, step, self.work_dir
        )
        set_state_dict(
            session.wrapped,
            session.optimizer,
            model_state_dict=checkpoint.model_state,
            optim_state_dict=checkpoint.optimizer_state,
            options=StateDictOptions(full_state_dict=True),
        )
        session.scheduler.load_state_dict(checkpoint.scheduler_state)
        if len(checkpoint.rng_states) == self.workers.world:
            checkpoints.restore_rng_state(checkpoint.rng_states[self.workers.rank])
        self.training_log = list(checkpoint.training_log)
        log.info("resumed from checkpoint", step=step, epoch=checkpoint.position.epoch)
        return checkpoint.position

    def _upload_model(
        self,
        prefix: str,
        name: str,
        model: PreTrainedModel,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        folder = save_model_folder(model, self.tokenizer, self.work_dir / name, state_dict)
        upload_folder(self.store, prefix, folder, lineage={"job_id": self.run.job_id, "stage": "train"})
        return folder

    def _upload_trained(
        self, state: dict[str, torch.Tensor], position: TrainingPosition, seconds: float
    ) -> None:
        folder = save_model_folder(self.model, self.tokenizer, self.work_dir / self.trainee.name, state)
        with (folder / "training_log.jsonl").open("w") as out:
            for line in self.training_log:
                out.write(json.dumps(line) + "\n")
        (folder / "README.md").write_text(
            model_card(self.run.teacher, self.trainee.training, self._card_data(position, seconds), None)
        )
        upload_folder(
            self.store,
            self.trainee.artifact_prefix,
            folder,
            lineage={"job_id": self.run.job_id, "stage": "train", "dataset": self.run.answers_dataset_id},
        )

    def _card_data(self, position: TrainingPosition, seconds: float) -> dict[str, Any]:
        counts = self.data.counts
        init = self.run.student.init
        data: dict[str, Any] = {
            "dataset": self.run.answers_dataset_id,
            "rows": counts.kept,
            "positions_trained": position.tokens,  # prompt and response tokens, every epoch
            "student_init": init.model_dump(mode="json", by_alias=True, exclude_none=True),
            "steps": position.step,
            "epochs": self.run.training.epochs,
            "precision": precision_label(self.autocast_dtype),
            "seconds": round(seconds, 1),
            "truncated_rows": counts.truncated,
            "dropped_rows": counts.rows - counts.kept,
        }
        if init.pretrained is not None:
            data["base_model"] = init.pretrained
        if self.teacher_layers is not None:
            data["teacher_layers_kept"] = self.teacher_layers
        if self.training_log:
            data["final_loss"] = round(self.training_log[-1]["loss"], 4)
        if self.trainee.on_policy is not None:
            data["on_policy_steps"] = self._on_policy_steps(position.step)
        if self.trainee.name == SFT_CONTROL:
            data["control"] = "SFT control: the student's initial weights, batches and steps, loss sft"
        if self.choice.fallback_reason is not None:
            requested = self.run.training.loss.kind.value
            data["loss_fallback"] = f"sft instead of {requested}: {self.choice.fallback_reason}"
        return data


@dataclass(frozen=True)
class _Session:
    """What one run of the loop trains with: the wrapped model (and the module its forward passes go
    through, compiled or the same), its optimizer and schedule, and the full teacher when one runs beside
    the student."""

    wrapped: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher_model: PreTrainedModel | None


@dataclass
class _Window:
    """Tokens and step time since the last report (checkpoint uploads are not counted)."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_worker(run: TrainRun, report: Report) -> TrainOutcome:
    """Train the student of `run` on this worker, then its controls (see the module docstring); `report`
    gets the progress figures of every `report_interval` steps and of the last step, on every worker
    alike, each naming its model."""
    workers = Workers.current()
    torch.manual_seed(run.training.seed)
    store = open_object_store(run.object_store)
    with tempfile.TemporaryDirectory(prefix="stillhouse-train-") as scratch:
        student = TrainingLoop.for_student(run, report, workers, store, Path(scratch))
        outcome = student.train()
        if "sft" not in run.controls:
            return outcome
        control = student.sft_control()
        del student  # its model: the control's takes its place
        return outcome.model_copy(update={"controls": {"sft": control.train()}})
