"""The checks run on a job at submit, before anything is paid: what the spec alone cannot tell, but the
teacher's and the student's tokenizers and configs can, and what would otherwise only fail in the train
stage, after the whole teacher stage has been paid for.

Pure functions of already loaded tokenizers and configs (`ModelFacts`); `preflight_loading` finds and
loads them. Each finding names the spec field to change, as a dotted path from the document root.

Errors (`violations`, the job is refused):
- a named model or tokenizer cannot be found or loaded;
- a logit loss (any kind but `sft`) without `fallbackToSft`, and a student whose tokenizer does not map
  text to the teacher's ids (vocabulary, end-of-sequence token, or the split of a probe text differ):
  the stored logprobs would index another vocabulary;
- a student without a chat template: training renders every prompt with it;
- a `local` teacher without a chat template: it cannot be asked anything;
- a student whose context (`max_position_embeddings`) is shorter than `training.maxSeqLen`;
- pruning the teacher as it cannot be pruned (not a Llama-family model; no fewer layers or channels
  than it has, or none at all);
- more workers or GPUs than a local Ray head has (a cluster may autoscale, so it is not checked);
- a student whose architecture cannot give its logits through its own forward at chosen positions
  (`student_logits.unsupported_architecture`), which training needs.

Warnings (the job runs, the user is told):
- a logit loss with `fallbackToSft` that will fall back, and why;
- other beginning-of-sequence or padding tokens than the teacher's: the labels are unaffected (padding
  is masked, a prompt is rendered by the student's own template);
- a chat template other than the teacher's: the student is trained and later used with its own, but the
  teacher answered prompts in its own format, so a student that depends on that format learns from
  prompts that read differently from the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stillhouse.common.jobspec import DistillationJobSpec, LossKind, TeacherBackend

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

TEACHER_MODEL = "spec.teacher.model"
TEACHER_TOKENIZER = "spec.teacher.tokenizer"
STUDENT_PRETRAINED = "spec.student.init.pretrained"
STUDENT_DEPTH = "spec.student.init.pruneTeacherDepth"
STUDENT_WIDTH = "spec.student.init.pruneTeacherWidth"
LOSS_KIND = "spec.training.loss.kind"
MAX_SEQ_LEN = "spec.training.maxSeqLen"
WORKERS = "spec.training.workers"
GPUS_PER_WORKER = "spec.training.gpusPerWorker"
CPUS_PER_WORKER = "spec.training.cpusPerWorker"


@dataclass(frozen=True)
class Finding:
    field: str
    message: str


@dataclass
class PreflightReport:
    violations: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class ModelShape:
    """What a model's config says that the checks use; None where it is not known."""

    model_type: str | None = None
    context_length: int | None = None
    num_layers: int | None = None
    intermediate_size: int | None = None


@dataclass(frozen=True)
class ModelFacts:
    """A model's tokenizer and shape (a tokenizer without a model has an empty shape)."""

    tokenizer: PreTrainedTokenizerBase
    shape: ModelShape = ModelShape()


def student_field(spec: DistillationJobSpec) -> str:
    """The field that decides the student's tokenizer and context: its pretrained model, or the teacher
    a derived student is built from."""
    return STUDENT_PRETRAINED if spec.student.init.pretrained is not None else TEACHER_MODEL


def derived_student(spec: DistillationJobSpec, teacher: ModelFacts) -> ModelFacts:
    """A student built from the teacher keeps its tokenizer and context, unless `config` sets another."""
    overrides = spec.student.init.config or {}
    context = overrides.get("max_position_embeddings", teacher.shape.context_length)
    return ModelFacts(
        teacher.tokenizer,
        ModelShape(
            model_type=teacher.shape.model_type,
            context_length=int(context) if context is not None else None,
        ),
    )


def derivation_violations(spec: DistillationJobSpec, teacher: ModelShape) -> list[Finding]:
    """Whether pruning can cut the teacher as asked (the rules of `student_init`)."""
    # student_init imports torch, which the trainer service does not load until a check needs it.
    from stillhouse.trainer.layer_influence import check_layers_to_keep
    from stillhouse.trainer.student_init import PRUNABLE_MODEL_TYPES, pruned_width

    init = spec.student.init
    # (option, field, the teacher's size it cuts, the rule, what the spec asks)
    asked = []
    if init.prune_teacher_depth is not None:
        depth = init.prune_teacher_depth
        asked.append(("pruneTeacherDepth", STUDENT_DEPTH, teacher.num_layers, check_layers_to_keep, depth))
    if init.prune_teacher_width is not None:
        width = init.prune_teacher_width
        asked.append(("pruneTeacherWidth", STUDENT_WIDTH, teacher.intermediate_size, pruned_width, width))
    if teacher.model_type is not None and teacher.model_type not in PRUNABLE_MODEL_TYPES:
        families = ", ".join(sorted(PRUNABLE_MODEL_TYPES))
        return [
            Finding(
                where,
                f"{option} works on Llama-family models ({families}); the teacher is a "
                f"{teacher.model_type!r} model: use `pretrained` or `config`",
            )
            for option, where, *_ in asked
        ]
    findings = []
    for _, where, size, rule, value in asked:
        try:
            if size is not None:
                rule(size, value)
        except ValueError as exc:
            findings.append(Finding(where, str(exc)))
    return findings


def architecture_violations(where: str, student: ModelShape) -> list[Finding]:
    """Whether training can run the student through its own forward (known model types only)."""
    if student.model_type is None:
        return []
    # student_logits imports torch, which the trainer service does not load until a check needs it.
    from stillhouse.trainer.student_logits import unsupported_architecture

    reason = unsupported_architecture(student.model_type)
    return [Finding(where, reason)] if reason else []


def check_models(
    spec: DistillationJobSpec, teacher: ModelFacts | None, student: ModelFacts
) -> PreflightReport:
    """The findings on a spec whose models were all found. `teacher` is None for an `openai` teacher
    without `tokenizer` (its vocabulary is unknown)."""
    report = PreflightReport()
    where = student_field(spec)
    if teacher is not None:
        report.violations += derivation_violations(spec, teacher.shape)
    local_teacher_lacks_template = (
        spec.teacher.backend is TeacherBackend.LOCAL
        and teacher is not None
        and not teacher.tokenizer.chat_template
    )
    if local_teacher_lacks_template:
        report.violations.append(
            Finding(TEACHER_MODEL, f"the `local` teacher {spec.teacher.model!r} has no chat template")
        )
    # A student derived from the teacher has the teacher's tokenizer: one finding is enough.
    if not student.tokenizer.chat_template and not (local_teacher_lacks_template and where == TEACHER_MODEL):
        report.violations.append(
            Finding(
                where,
                "the student's tokenizer has no chat template, and training renders every prompt with it: "
                "give a student whose tokenizer has one (an instruct model, or its tokenizer_config.json "
                "with `chat_template`)",
            )
        )
    report.violations += architecture_violations(where, student.shape)
    max_seq_len = spec.training.max_seq_len
    context = student.shape.context_length
    if context is not None and context < max_seq_len:
        report.violations.append(
            Finding(
                MAX_SEQ_LEN,
                f"training.maxSeqLen {max_seq_len} is longer than the student's context of {context} "
                f"tokens (max_position_embeddings of the model {where.removeprefix('spec.')} names): use "
                f"at most {context}",
            )
        )
    if teacher is not None:
        _compare_tokenizers(spec, teacher.tokenizer, student.tokenizer, report)
    elif spec.training.loss.kind is not LossKind.SFT:
        # The schema admits this only with fallbackToSft.
        report.warnings.append(
            Finding(
                TEACHER_TOKENIZER,
                f"training.loss.kind `{spec.training.loss.kind.value}` falls back to `sft`: an `openai` "
                "teacher without teacher.tokenizer has no known vocabulary to compare the student's with",
            )
        )
    return report


def _compare_tokenizers(
    spec: DistillationJobSpec,
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    report: PreflightReport,
) -> None:
    from stillhouse.trainer.student_init import check_tokenizers  # imports torch: see above

    where = student_field(spec)
    loss = spec.training.loss
    difference = check_tokenizers(student, teacher)
    if difference is not None and loss.kind is not LossKind.SFT:
        if loss.fallback_to_sft:
            report.warnings.append(
                Finding(where, f"training.loss.kind `{loss.kind.value}` falls back to `sft`: {difference}")
            )
        else:
            report.violations.append(
                Finding(
                    where,
                    f"training.loss.kind `{loss.kind.value}` compares the student's and the teacher's "
                    f"token distributions, but {difference}. Give the student the teacher's tokenizer "
                    "(e.g. student.init pruneTeacherDepth or config), use kind `sft`, or set "
                    "training.loss.fallbackToSft",
                )
            )
    if difference is None:
        for name in ("bos_token", "pad_token"):
            theirs, ours = getattr(teacher, name), getattr(student, name)
            if theirs != ours:
                report.warnings.append(
                    Finding(where, f"the {name} differs: {ours!r} (student), {theirs!r} (teacher)")
                )
    if student.chat_template and teacher.chat_template and student.chat_template != teacher.chat_template:
        report.warnings.append(
            Finding(
                where,
                "the student's chat template differs from the teacher's: the student is trained with its "
                "own, on answers the teacher gave to prompts in the teacher's format",
            )
        )


def capacity_violations(
    workers: int, gpus_per_worker: float, capacity: tuple[int, int] | None, cpus_per_worker: int = 1
) -> list[Finding]:
    """What a local Ray head of `capacity` (CPUs, GPUs) cannot give; a cluster (None) may autoscale."""
    if capacity is None:
        return []
    cpus, gpus = capacity
    found = []
    if workers * gpus_per_worker > gpus:
        found.append(
            Finding(
                GPUS_PER_WORKER,
                f"training.workers * training.gpusPerWorker asks for {workers * gpus_per_worker:g} GPUs, "
                f"but the local Ray cluster has {gpus}: lower them, or point the trainer at a Ray cluster",
            )
        )
    if workers * cpus_per_worker > cpus:
        field = WORKERS if cpus_per_worker == 1 else CPUS_PER_WORKER
        found.append(
            Finding(
                field,
                f"training.workers * training.cpusPerWorker asks for {workers * cpus_per_worker} CPUs, but "
                f"the local Ray cluster has {cpus}: lower them, or point the trainer at a Ray cluster",
            )
        )
    return found
