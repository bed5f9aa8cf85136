"""The DistillationJob spec: the one schema a user writes, the API validates and every service reads.

Kubernetes-shaped (apiVersion/kind/metadata/spec) with camelCase field names, so a job reads like any
other object in a cluster. Every field has a documented default except `spec.teacher` and
`spec.student`; unknown fields are refused so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from stillhouse.common.models.references import check_model_reference

API_VERSION = "stillhouse.dev/v1"
KIND = "DistillationJob"

# RFC 1123 label, the rule Kubernetes applies to object names.
KUBERNETES_NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# A key's name in the teacher's key store: a file name in one folder or the suffix of one environment
# variable, so never a path (no separator, no leading dot) and never any other variable.
SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


# Bounds on what one spec may ask for. A spec comes from any user of a shared cluster, so every size,
# count and number has an upper bound (shown in the schema), and no float may be infinite or NaN.
MAX_PATH = 1024
MAX_NAME = 128
MAX_SEED = 2**32 - 1
MAX_COUNT = 10_000_000  # prompts generated, or rows sampled from one source
MAX_PROMPT_CHARS = 65_536
MAX_INLINE_PROMPTS = 10_000
MAX_TEMPLATE_CHARS = 8192
MAX_SLOTS = 32
MAX_SLOT_VALUES = 10_000
MAX_SLOT_VALUE_CHARS = 1024
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_TOKENS = 131_072  # generated per answer, or in one training sequence

SpecPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class SpecModel(BaseModel):
    """Base for every part of the spec: camelCase on the wire (one spelling only), unknown fields refused,
    floats finite."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True, allow_inf_nan=False)


class Metadata(SpecModel):
    name: str | None = Field(
        default=None,
        max_length=63,
        description="Human-readable job name (RFC 1123 label). Defaults to the job id.",
    )
    labels: dict[
        Annotated[str, Field(min_length=1, max_length=63)], Annotated[str, Field(max_length=MAX_LABEL_VALUE)]
    ] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description=f"Free-form labels to filter jobs by: at most {MAX_LABELS}, names of at most 63 "
        f"characters, values of at most {MAX_LABEL_VALUE}.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_label(cls, value: str | None) -> str | None:
        if value is not None and not KUBERNETES_NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "must be lower-case letters, digits and '-', start and end with a letter or digit, "
                "at most 63 characters"
            )
        return value


# --- the prompts stage --------------------------------------------------------------------------


class PromptSource(SpecModel):
    """Seed prompts: a file in storage or on disk, or an inline list."""

    path: SpecPath | None = Field(
        default=None,
        description="JSONL, Parquet or CSV file: s3://bucket/key, or (embedded mode) a local path inside the "
        "platform's input roots.",
    )
    inline: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, max_length=MAX_INLINE_PROMPTS, description="Prompts given directly in the spec."
    )
    format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        default="auto", description="File format; `auto` infers it from the extension."
    )
    column: str = Field(
        default="prompt", max_length=MAX_NAME, description="Column holding the prompt text in plain rows."
    )
    limit: Annotated[int, Field(gt=0, le=MAX_COUNT)] | None = Field(
        default=None, description="Take a seeded random sample of at most this many rows."
    )

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> PromptSource:
        if (self.path is None) == (self.inline is None):
            raise ValueError("give exactly one of `path` or `inline`")
        if self.inline is not None and not self.inline:
            raise ValueError("`inline` must list at least one prompt")
        return self


class GenerationStrategy(StrEnum):
    NONE = "none"
    TEMPLATE = "template"
    SELF_INSTRUCT = "self_instruct"
    EVOL_INSTRUCT = "evol_instruct"


class SlotCombination(StrEnum):
    ALL = "all"
    SAMPLED = "sampled"


class Evolution(StrEnum):
    """Evol-Instruct rewrites: in depth (harder versions of the same task) and in breadth (a new task)."""

    DEEPEN = "deepen"
    CONSTRAIN = "constrain"
    CONCRETIZE = "concretize"
    REASONING = "reasoning"
    BREADTH = "breadth"


class PromptGeneration(SpecModel):
    strategy: GenerationStrategy = Field(
        default=GenerationStrategy.NONE, description="How to add prompts beyond the sources."
    )
    count: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        default=0, description="Number of prompts to generate, on top of those read from the sources."
    )
    template: str | None = Field(
        default=None, max_length=MAX_TEMPLATE_CHARS, description="Jinja template, for `template`."
    )
    slots: dict[
        Annotated[str, Field(min_length=1, max_length=MAX_NAME)],
        Annotated[
            list[Annotated[str, Field(max_length=MAX_SLOT_VALUE_CHARS)]], Field(max_length=MAX_SLOT_VALUES)
        ],
    ] = Field(
        default_factory=dict,
        max_length=MAX_SLOTS,
        description=f"Slot values, for `template`: at most {MAX_SLOTS} slots of at most {MAX_SLOT_VALUES} "
        "values each.",
    )
    slot_files: dict[Annotated[str, Field(min_length=1, max_length=MAX_NAME)], SpecPath] = Field(
        default_factory=dict,
        max_length=MAX_SLOTS,
        description="Slot values from files (s3://, or a local path inside the input roots in embedded "
        "mode), one value per line, for `template`.",
    )
    slot_combination: SlotCombination = Field(
        default=SlotCombination.ALL,
        description="`all`: every combination of slot values in a seeded order, up to `count`; "
        "`sampled`: each prompt draws its slot values at random.",
    )
    few_shot: Annotated[int, Field(gt=0, le=32)] = Field(
        default=6, description="Example instructions shown per teacher call, for `self_instruct`."
    )
    evolutions: list[Evolution] = Field(
        default_factory=lambda: list(Evolution),
        min_length=1,
        max_length=len(Evolution),
        description="Rewrites to choose from, for `evol_instruct`.",
    )
    rounds: Annotated[int, Field(gt=0, le=8)] = Field(
        default=1, description="Times a prompt is evolved in a row, for `evol_instruct`."
    )
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(
        default=1.0, description="Sampling temperature of the teacher calls that generate prompts."
    )

    @field_validator("slots")
    @classmethod
    def _slots_bounded(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, values in value.items():
            if len(values) > MAX_SLOT_VALUES:
                raise ValueError(f"slot {name!r} has {len(values)} values; at most {MAX_SLOT_VALUES}")
        return value

    @model_validator(mode="after")
    def _strategy_has_what_it_needs(self) -> PromptGeneration:
        if self.strategy is GenerationStrategy.TEMPLATE and not self.template:
            raise ValueError("`template` is required when `strategy` is `template`")
        if self.strategy is not GenerationStrategy.NONE and self.count == 0:
            raise ValueError(f"`count` must be positive when `strategy` is `{self.strategy.value}`")
        return self


class PromptFilters(SpecModel):
    dedup: bool = Field(default=True, description="Remove exact duplicates (normalised text).")
    near_dup_threshold: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=0.8, description="Jaccard threshold for MinHash near-duplicate removal; null turns it off."
    )
    min_chars: Annotated[int, Field(ge=0, le=MAX_PROMPT_CHARS)] = Field(
        default=1, description="Shortest prompt kept."
    )
    max_chars: Annotated[int, Field(gt=0, le=MAX_PROMPT_CHARS)] = Field(
        default=8192, description="Longest prompt kept."
    )
    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(
        default_factory=list, max_length=256, description="ISO 639-1 codes kept; empty keeps all."
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> PromptFilters:
        if self.min_chars > self.max_chars:
            raise ValueError("`minChars` must not exceed `maxChars`")
        return self


class PromptsSpec(SpecModel):
    sources: list[PromptSource] = Field(
        default_factory=list, max_length=64, description="Seed prompt sources (at most 64)."
    )
    generate: PromptGeneration = Field(default_factory=PromptGeneration)
    filters: PromptFilters = Field(default_factory=PromptFilters)
    system_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="System message sent with every prompt."
    )
    seed: Seed = Field(default=0, description="Seed for sampling, generation and the held-out split.")


# --- the teacher stage --------------------------------------------------------------------------


class TeacherBackend(StrEnum):
    OPENAI = "openai"
    LOCAL = "local"


# Request fields that Stillhouse sets itself: `sampling.extraBody` may not override them.
RESERVED_REQUEST_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "n",
        "stream",
        "seed",
        "logprobs",
        "top_logprobs",
        "return_tokens_as_token_ids",
    }
)
_EXTRA_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_EXTRA_FIELDS = 16
MAX_EXTRA_STRING = 256


MAX_EXTRA_NUMBER = 1e12


# A scalar of a free-form map of the spec (`sampling.extraBody`, `student.init.config`). Its bounds are
# checked by `check_scalars`, so that a refusal names the map's key; the schema states them.
ExtraValue = Annotated[
    bool | int | Annotated[float, Field(allow_inf_nan=True)] | str,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "boolean"},
                {"type": "number", "minimum": -MAX_EXTRA_NUMBER, "maximum": MAX_EXTRA_NUMBER},
                {"type": "string", "maxLength": MAX_EXTRA_STRING},
            ]
        }
    ),
]


def check_scalars(value: dict[str, ExtraValue]) -> dict[str, ExtraValue]:
    for name, item in value.items():
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"field {name!r} must be a finite number")
        if isinstance(item, int | float) and not isinstance(item, bool) and abs(item) > MAX_EXTRA_NUMBER:
            raise ValueError(
                f"field {name!r} must lie between -{MAX_EXTRA_NUMBER:g} and {MAX_EXTRA_NUMBER:g}"
            )
        if isinstance(item, str) and len(item) > MAX_EXTRA_STRING:
            raise ValueError(f"field {name!r} is longer than {MAX_EXTRA_STRING} characters")
    return value


class Sampling(SpecModel):
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 512
    seed: Seed | None = Field(default=None, description="Sampling seed where the backend honours one.")
    extra_body: dict[str, ExtraValue] = Field(
        default_factory=dict,
        max_length=MAX_EXTRA_FIELDS,
        description="Server-specific sampling fields added to every request of an `openai` teacher, such "
        "as `repeat_penalty: 1.0` for llama.cpp's server (whose default penalty makes even temperature 0 "
        "pick tokens other than its reported top-1) or `top_k` for vLLM. Scalars only, at most "
        f"{MAX_EXTRA_FIELDS} fields; part of the cache key. Fields Stillhouse sets itself are refused.",
    )

    @field_validator("extra_body")
    @classmethod
    def _extra_body_is_small_and_plain(cls, value: dict[str, ExtraValue]) -> dict[str, ExtraValue]:
        for name in value:
            if not _EXTRA_FIELD_NAME.fullmatch(name):
                raise ValueError(
                    f"field name {name[:64]!r} must be lower-case letters, digits and '_', starting with a "
                    "letter, at most 64 characters"
                )
            if name in RESERVED_REQUEST_FIELDS:
                raise ValueError(f"field {name!r} is set by Stillhouse itself: use the spec's own field")
        return check_scalars(value)


class TeacherLimits(SpecModel):
    requests_per_minute: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0, le=10_000_000_000)] | None = None
    max_concurrency: Annotated[int, Field(gt=0, le=4096)] = 64
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    max_retries: Annotated[int, Field(ge=0, le=50)] = 8


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class TeacherSpec(SpecModel):
    backend: TeacherBackend = Field(description="`openai` (any OpenAI-compatible API) or `local`.")
    model: str = Field(
        min_length=1,
        max_length=MAX_PATH,
        description="Model name (openai); for `local`, the model's folder or .gguf file: "
        "s3://<bucket>/<prefix> (downloaded once into the model cache), an absolute path under the "
        "platform's models root, or "
        "`<distribution>/<file>` of an installed package.",
    )
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="API base URL (http or https); required for `openai`. Its host must pass the teacher "
        "service's egress policy: link-local, metadata, private and cluster-internal addresses are refused "
        "unless allow-listed.",
    )
    revision: str | None = Field(
        default=None, max_length=MAX_NAME, description="Model revision, part of the cache key."
    )
    api_key_secret: str | None = Field(
        default=None,
        pattern=SECRET_NAME_PATTERN,
        description="Name of the API key in the teacher service's key store: a file of its key folder "
        "(a mounted Secret on a cluster; `$STILLHOUSE_HOME/secrets` embedded), else the environment "
        "variable `STILLHOUSE_TEACHER_KEY_<NAME>` (upper case, `-` and `.` as `_`). Letters, digits, `-`, "
        "`_` and `.`, starting with a letter or digit, at most 63 characters: never a path or another "
        "variable. The key itself never appears in a spec.",
    )
    tokenizer: str | None = Field(
        default=None,
        max_length=MAX_PATH,
        description="For `openai` with logprobs: a local Hugging Face tokenizer (folder or model reference) "
        "that turns the teacher's logprob tokens into ids, and that the student's vocabulary is checked "
        "against at submit. Without it the server must send ids itself (vLLM's "
        "`return_tokens_as_token_ids`) and the loss must be `sft` or set `fallbackToSft`: a logit loss "
        "needs to know that the student shares the teacher's vocabulary.",
    )
    sampling: Sampling = Field(default_factory=Sampling)
    top_logprobs: Annotated[int, Field(ge=0, le=256)] = Field(
        default=20, description="Top-k logprobs captured per generated token (OpenAI caps this at 20)."
    )
    limits: TeacherLimits = Field(default_factory=TeacherLimits)
    precision: Precision = Field(
        default=Precision.AUTO,
        description="For `local`: the dtype the teacher's weights compute in, and so its answers and "
        "logprobs: `bf16`, `fp32`, or `auto`: bf16 on a GPU and on a CPU with bf16 matrix units (Intel "
        "AMX, AVX512-BF16), fp32 elsewhere. Part of the cache key. An `openai` teacher's server decides.",
    )
    budget_usd: Annotated[float, Field(gt=0, le=1_000_000)] | None = Field(
        default=None,
        alias="budgetUSD",
        description="Hard spending limit; the stage stops cleanly when reached.",
    )

    @field_validator("model")
    @classmethod
    def _local_model_is_a_model_reference(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("backend") is TeacherBackend.LOCAL:
            check_model_reference(value, "teacher.model")
        return value

    @model_validator(mode="after")
    def _fields_fit_the_backend(self) -> TeacherSpec:
        if self.backend is TeacherBackend.OPENAI and not self.base_url:
            raise ValueError("`baseURL` is required when `backend` is `openai`")
        if self.backend is TeacherBackend.LOCAL and self.sampling.extra_body:
            raise ValueError(
                "`sampling.extraBody` is sent to an `openai` teacher's server; a `local` teacher has none"
            )
        if self.backend is TeacherBackend.OPENAI and self.precision is not Precision.AUTO:
            raise ValueError("`precision` applies to a `local` teacher; an `openai` teacher's server decides")
        return self


# --- the train stage: student and training ------------------------------------------------------


class StudentInit(SpecModel):
    """One way to initialise the student; depth and width pruning of the teacher may go together."""

    pretrained: SpecPath | None = Field(
        default=None,
        description="A Hugging Face model to start from: s3://<bucket>/<prefix> (downloaded once into the "
        "model cache) or an absolute path under the platform's models root.",
    )
    prune_teacher_depth: Annotated[int, Field(gt=0, le=1024)] | None = Field(
        default=None, description="Copy the teacher keeping this many layers."
    )
    prune_teacher_width: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        default=None,
        description="Copy the teacher keeping this fraction of the MLP width; with pruneTeacherDepth, of the "
        "kept layers' MLP width.",
    )
    config: dict[Annotated[str, Field(min_length=1, max_length=MAX_NAME)], ExtraValue] | None = Field(
        default=None,
        max_length=64,
        description="Fresh model from a config (overrides on the teacher's config).",
    )
    layer_selection: Literal["influence", "spread"] | None = Field(
        default=None,
        description="With pruneTeacherDepth, which layers are kept: `influence` (the default), the first, "
        "the last and those that change the teacher's hidden states most on the training answers (Block "
        "Influence); `spread`, the first, the last and the others evenly spaced between them (needs no "
        "data).",
    )

    @field_validator("pretrained")
    @classmethod
    def _pretrained_is_a_model_reference(cls, value: str | None) -> str | None:
        if value is not None:
            check_model_reference(value, "student.init.pretrained")
        return value

    @field_validator("config")
    @classmethod
    def _config_is_plain(cls, value: dict[str, ExtraValue] | None) -> dict[str, ExtraValue] | None:
        return None if value is None else check_scalars(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentInit:
        pruned = self.prune_teacher_depth is not None or self.prune_teacher_width is not None
        chosen = [name for name in ("pretrained", "config") if getattr(self, name) is not None]
        if len(chosen) + pruned != 1:
            raise ValueError(
                "give exactly one of `pretrained`, `config`, or pruning of the teacher (`pruneTeacherDepth`, "
                "`pruneTeacherWidth` or both)"
            )
        if self.layer_selection is not None and self.prune_teacher_depth is None:
            raise ValueError("`layerSelection` chooses the layers of `pruneTeacherDepth`: give that too")
        return self


class StudentSpec(SpecModel):
    init: StudentInit


class LossKind(StrEnum):
    SFT = "sft"
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class LossSpec(SpecModel):
    kind: LossKind = LossKind.FORWARD_KL
    temperature: Annotated[float, Field(gt=0, le=100)] = 1.0
    ce_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="Weight of cross-entropy on teacher text mixed into the KD loss."
    )
    beta: Annotated[float, Field(ge=0, le=1)] = Field(default=0.5, description="Mixture weight for `jsd`.")
    unlikelihood_weight: Annotated[float, Field(ge=0, le=10)] = Field(
        default=0.0,
        description="Weight of token-level unlikelihood (Welleck et al. 2020) added to the loss: at each "
        "response token, -log(1 - p) of every distinct earlier token of the same response but the label. "
        "It discourages the loops that small students fall into; the SFT control gets it too.",
    )
    teacher_logits: Literal["stored", "full"] = Field(
        default="stored",
        description="`stored`: the top-k logprobs saved with the teacher's answers; `full`: full logits "
        "from a `local` teacher, computed during training.",
    )
    fallback_to_sft: bool = Field(
        default=False,
        description="When the student's tokenizer differs from the teacher's, train with `sft` instead of "
        "refusing the job (logit losses need a shared vocabulary).",
    )


class TrainingStrategy(StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"


class OnPolicySpec(SpecModel):
    """On-policy distillation (GKD, Agarwal et al. 2024): part of the batches train on the student's own
    generations, scored by the teacher's full logits, so that the student learns from the states it
    reaches itself rather than only from the teacher's."""

    fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5,
        description="λ: the share of batches whose responses the student generates itself; the rest train "
        "on the teacher's answers.",
    )
    max_new_tokens: Annotated[int, Field(gt=0, le=4096)] = Field(
        default=64, description="Most tokens the student generates per prompt in an on-policy batch."
    )
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(
        default=1.0, description="Sampling temperature of the student's generations (0: greedy)."
    )


class TrainingSpec(SpecModel):
    loss: LossSpec = Field(default_factory=LossSpec)
    on_policy: OnPolicySpec | None = Field(
        default=None,
        description="On-policy distillation; needs a `local` teacher (its full logits score the student's "
        "generations) and a logit loss. Off (null) by default.",
    )
    epochs: Annotated[int, Field(gt=0, le=1000)] = 1
    learning_rate: Annotated[float, Field(gt=0, le=1e6)] = 2.0e-5
    batch_tokens: Annotated[int, Field(gt=0, le=1 << 26)] = Field(
        default=16384, description="Tokens per optimizer step."
    )
    max_seq_len: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 1024
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    workers: Annotated[int, Field(gt=0, le=1024)] = 1
    cpus_per_worker: Annotated[int, Field(gt=0, le=512)] = Field(
        default=1,
        description="CPU cores each worker holds on the Ray cluster; its PyTorch runs as many threads. On "
        "a CPU, one worker on every core trains faster than a worker per core: DDP adds an all-reduce of "
        "every gradient to each step.",
    )
    gpus_per_worker: Annotated[float, Field(ge=0, le=16)] = 0
    strategy: TrainingStrategy = TrainingStrategy.DDP
    precision: Precision = Field(
        default=Precision.AUTO,
        description="The forward pass's precision while training (weights, optimizer state and losses stay "
        "float32): `bf16` autocast, `fp32`, or `auto`: bf16 on a GPU and on a CPU with bf16 matrix units "
        "(Intel AMX, AVX512-BF16), fp32 elsewhere.",
    )
    checkpoint_every_steps: Annotated[int, Field(gt=0, le=MAX_COUNT)] = 200
    seed: Seed = 0


class EvaluationSpec(SpecModel):
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.02, description="Fraction of prompts held out for evaluation."
    )
    max_new_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 128
    controls: list[Literal["sft"]] = Field(
        default_factory=list,
        max_length=1,
        description="Control students trained beside the real one and reported with it: `sft` trains "
        "the same student with plain cross-entropy on the teacher's text, for the same steps and tokens, "
        "so that the report shows what the logit loss adds.",
    )

    @field_validator("controls")
    @classmethod
    def _controls_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each control may be listed once")
        return value


class DistillationJobSpec(SpecModel):
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    teacher: TeacherSpec
    student: StudentSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _teacher_derived_student_needs_teacher_weights(self) -> DistillationJobSpec:
        init = self.student.init
        if init.pretrained is None and self.teacher.backend is not TeacherBackend.LOCAL:
            raise ValueError(
                "student.init pruneTeacherDepth, pruneTeacherWidth and config start from the teacher's "
                "weights "
                "or config, which only a `local` teacher has: use `pretrained` with an `openai` teacher"
            )
        return self

    @model_validator(mode="after")
    def _on_policy_has_a_scorer(self) -> DistillationJobSpec:
        if self.training.on_policy is None:
            return self
        if self.teacher.backend is not TeacherBackend.LOCAL:
            raise ValueError(
                "training.onPolicy scores the student's own generations with the teacher's full logits, "
                "which only a `local` teacher has: remove onPolicy or use a `local` teacher"
            )
        if self.training.loss.kind is LossKind.SFT:
            raise ValueError(
                "training.onPolicy needs a logit loss (forward_kl, reverse_kl or jsd): kind `sft` has no "
                "teacher distribution to score the student's generations with"
            )
        return self

    @model_validator(mode="after")
    def _loss_has_its_teacher_signal(self) -> DistillationJobSpec:
        loss = self.training.loss
        if loss.kind is LossKind.SFT:
            return self
        if loss.teacher_logits == "full" and self.teacher.backend is not TeacherBackend.LOCAL:
            raise ValueError(
                "training.loss.teacherLogits `full` needs a `local` teacher; use `stored` with topLogprobs"
            )
        if loss.teacher_logits == "stored" and self.teacher.top_logprobs == 0:
            raise ValueError(
                f"training.loss.kind `{loss.kind.value}` learns from the teacher's logprobs, but "
                "teacher.topLogprobs is 0: set topLogprobs (e.g. 20) or use kind `sft`"
            )
        return self

    @model_validator(mode="after")
    def _logit_loss_can_compare_vocabularies(self) -> DistillationJobSpec:
        loss = self.training.loss
        if loss.kind is LossKind.SFT or loss.fallback_to_sft:
            return self
        if self.teacher.backend is TeacherBackend.OPENAI and not self.teacher.tokenizer:
            raise ValueError(
                f"training.loss.kind `{loss.kind.value}` compares the student's and the teacher's token "
                "distributions, which needs the two vocabularies to be the same, but an `openai` teacher "
                "without teacher.tokenizer has no known vocabulary: set teacher.tokenizer (the teacher's "
                "tokenizer, a folder the teacher and trainer services can read), use kind `sft`, or set "
                "training.loss.fallbackToSft"
            )
        return self


class DistillationJob(SpecModel):
    """A whole job document, as submitted to `POST /v1/jobs`."""

    api_version: Literal["stillhouse.dev/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["DistillationJob"] = KIND
    metadata: Metadata = Field(default_factory=Metadata)
    spec: DistillationJobSpec

    def to_document(self) -> dict:
        """The job as JSON-ready camelCase data, with every default filled in."""
        return self.model_dump(mode="json", by_alias=True)
