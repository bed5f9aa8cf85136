"""The student before training: a pretrained model, a copy of the teacher pruned in depth, width or both,
or a fresh model from the teacher's config (`StudentInit`), with the tokenizer it uses.

Every student is returned in float32 on the CPU, in train mode, with no quantization left on it (a GGUF
model is dequantized on load; the quantizer transformers keeps on it is dropped), so that
``save_pretrained`` writes a plain model that ``from_pretrained`` loads back. The training loop moves it
to its device and chooses its precision.

Pruning works on Llama-family decoders (`PRUNABLE_MODEL_TYPES`: the same decoder layer and gated MLP
layout, ``model.layers[i].mlp.{gate,up,down}_proj``); SmolLM2 is a Llama.

- Depth: keep the first and the last decoder layer, and between them either the layers that change
  the hidden states most on calibration text (layerSelection `influence`, the default: see
  `layer_influence`; the caller ranks them as `choose_layers`) or evenly spaced ones (`spread`:
  `evenly_spread_layers`). Layer-importance studies of LLMs find the first and the last layers the least
  dispensable and neighbouring middle layers the most alike (Minitron: Muralidharan et al. 2024; Gromov
  et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; ShortGPT: Men et al. 2024).
- Width: keep each MLP's most important intermediate channels, ranked on calibration text (see
  `channel_importance`; the caller ranks them as `rank_channels`). With depth pruning too, the layers are
  chosen on the whole teacher first, then the channels of the kept layers are ranked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from stillhouse.common.jobspec import StudentInit, TeacherBackend, TeacherSpec
from stillhouse.common.models.locator import Locate
from stillhouse.common.models.model_loading import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    load_tokenizer_reference,
    resolve_model_reference,
)
from stillhouse.trainer.layer_influence import check_layers_to_keep, evenly_spread_layers

PRUNABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Pruned MLP widths are rounded to a multiple of this, which GPU matrix kernels prefer.
WIDTH_MULTIPLE = 8
# Keys of `config` that would change the architecture rather than size it.
_FIXED_CONFIG_KEYS = frozenset({"model_type", "architectures", "quantization_config"})
# Picks the layers a depth-pruned student keeps: (teacher copy, tokenizer, how many) -> ascending indices.
LayerChooser = Callable[[PreTrainedModel, PreTrainedTokenizerBase, int], list[int]]
# Ranks the MLP channels of a width-pruned student: (model, tokenizer) -> each layer's channel importance.
ChannelRanker = Callable[[PreTrainedModel, PreTrainedTokenizerBase], Sequence[torch.Tensor]]
# Text that two tokenizers with the same vocabulary must split the same way.
_PROBE_TEXT = "Hello, world! It's 3.14159 -- naïve café, 東京, emoji 🙂.\n\tdef f(x):\n        return x ** 2"


def build_student(
    init: StudentInit,
    teacher: TeacherSpec,
    locate: Locate,
    choose_layers: LayerChooser | None = None,
    rank_channels: ChannelRanker | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The untrained student and its tokenizer. `locate` turns the spec's model references (an
    ``s3://`` folder, a local path) into local files (`ModelLocator.locate`). Pruning and `config` start
    from a `local` teacher's weights or config. `choose_layers` picks the layers of `pruneTeacherDepth`
    with layerSelection `influence`, and `rank_channels` the MLP channels of `pruneTeacherWidth`: both
    need calibration text (see `layer_influence` and `channel_importance`)."""
    if init.pretrained is not None:
        return _pretrained(init.pretrained, locate)
    source = _local_teacher(teacher, locate)
    tokenizer = load_tokenizer(source)
    if init.config is not None:
        return fresh_model(load_config(source), init.config, len(tokenizer)), tokenizer
    model = _plain_model(source)
    _prune(model, tokenizer, init, choose_layers, rank_channels)
    return model, tokenizer


def _prune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    init: StudentInit,
    choose_layers: LayerChooser | None,
    rank_channels: ChannelRanker | None,
) -> None:
    """Depth first, so that layers are ranked on the whole teacher, then the kept layers' width."""
    if init.prune_teacher_depth is not None:
        keep = init.prune_teacher_depth
        check_layers_to_keep(len(_decoder_layers(model, "pruneTeacherDepth")), keep)
        if choose_layers is not None:
            prune_depth(model, choose_layers(model, tokenizer, keep))
        elif init.layer_selection == "spread":
            prune_depth(model, evenly_spread_layers(len(model.model.layers), keep))
        else:
            raise ValueError("student.init layerSelection `influence` needs calibration text to rank layers")
    if init.prune_teacher_width is not None:
        _decoder_layers(model, "pruneTeacherWidth")  # refuses a model whose channels cannot be ranked
        if rank_channels is None:
            raise ValueError("student.init pruneTeacherWidth needs calibration text to rank MLP channels")
        prune_width(model, init.prune_teacher_width, rank_channels(model, tokenizer))


def teacher_tokenizer(teacher: TeacherSpec, locate: Locate) -> PreTrainedTokenizerBase | None:
    """The tokenizer whose ids the teacher's stored logprobs use: a local teacher's own; for an `openai`
    teacher the one its spec names (`tokenizer`: a tokenizer folder or a model reference), else None
    (its vocabulary is unknown)."""
    if teacher.backend is TeacherBackend.LOCAL:
        return load_tokenizer(_local_teacher(teacher, locate))
    if not teacher.tokenizer:
        return None
    return load_tokenizer_reference(teacher.tokenizer)


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    """None when the two tokenizers map text to the same ids (same token → id map, same end-of-sequence
    token, same split of a probe text); otherwise why they differ, in a sentence."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = sorted(set(student_vocab) - set(teacher_vocab))
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
        moved = sorted(
            token
            for token in set(student_vocab) & set(teacher_vocab)
            if student_vocab[token] != teacher_vocab[token]
        )
        details = [
            f"{len(tokens)} tokens only in the {side}'s (e.g. {tokens[:3]})"
            for side, tokens in (("student", only_student), ("teacher", only_teacher))
            if tokens
        ]
        if moved:
            token = moved[0]
            details.append(
                f"{len(moved)} tokens with other ids (e.g. {token!r}: {student_vocab[token]} in the "
                f"student's, {teacher_vocab[token]} in the teacher's)"
            )
        return (
            f"the student's vocabulary ({len(student_vocab)} tokens) differs from the teacher's "
            f"({len(teacher_vocab)} tokens): {'; '.join(details)}"
        )
    if student.eos_token != teacher.eos_token:
        return (
            f"the end-of-sequence tokens differ: {student.eos_token!r} (student), "
            f"{teacher.eos_token!r} (teacher)"
        )
    student_ids = student.encode(_PROBE_TEXT, add_special_tokens=False)
    teacher_ids = teacher.encode(_PROBE_TEXT, add_special_tokens=False)
    if student_ids != teacher_ids:
        return "the vocabularies are the same but the tokenizers split text differently"
    return None


# --- depth ---------------------------------------------------------------------------------------------


def prune_depth(model: PreTrainedModel, kept: Sequence[int]) -> None:
    """Cut `model` down to the decoder layers `kept` (ascending indices), in place."""
    layers = _decoder_layers(model, "pruneTeacherDepth")
    kept = list(kept)
    if kept != sorted(set(kept)) or not kept or kept[0] < 0 or kept[-1] >= len(layers):
        raise ValueError(f"layers to keep must be ascending indices below {len(layers)}; got {kept}")
    keep = len(kept)
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        # Attention finds its slot in the KV cache by its layer index.
        layer.self_attn.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]


# --- width ---------------------------------------------------------------------------------------------


def pruned_width(intermediate_size: int, fraction: float) -> int:
    """`fraction` of the MLP width, rounded to a multiple of `WIDTH_MULTIPLE` (at least one multiple)."""
    width = max(WIDTH_MULTIPLE, round(fraction * intermediate_size / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    if width >= intermediate_size:
        raise ValueError(
            f"pruneTeacherWidth {fraction} of the teacher's MLP width {intermediate_size}, rounded to a "
            f"multiple of {WIDTH_MULTIPLE}, keeps every channel: use a smaller fraction"
        )
    return width


def prune_width(model: PreTrainedModel, fraction: float, importance: Sequence[torch.Tensor]) -> int:
    """Keep `fraction` of every MLP's intermediate channels, those of most `importance` (one tensor per
    decoder layer, a value per channel), in place; the new intermediate size."""
    layers = _decoder_layers(model, "pruneTeacherWidth")
    width = pruned_width(model.config.intermediate_size, fraction)
    if len(importance) != len(layers):
        raise ValueError(f"channel importance for {len(importance)} layers; the model has {len(layers)}")
    for layer, channel_importance in zip(layers, importance, strict=True):
        mlp = layer.mlp
        channels = channel_importance.topk(width).indices.sort().values
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=channels)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=channels)
        mlp.down_proj = _sliced_linear(mlp.down_proj, columns=channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    model.config.intermediate_size = width
    return width


def _sliced_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None
) -> nn.Linear:
    """A copy of `linear` keeping the output features `rows` or the input features `columns`."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced


# --- fresh ---------------------------------------------------------------------------------------------


def fresh_model(
    teacher_config: PretrainedConfig, overrides: Mapping[str, int | float | str | bool], vocabulary: int
) -> PreTrainedModel:
    """A randomly initialised model of the teacher's architecture with `overrides` on its config (Hugging
    Face config keys, e.g. ``num_hidden_layers``). Seed torch beforehand for reproducible weights.
    `vocabulary` is the tokenizer's size, below which ``vocab_size`` may not go."""
    current = teacher_config.to_dict()
    unknown = sorted(key for key in overrides if key not in current)
    if unknown:
        raise ValueError(
            f"student.init.config: unknown {teacher_config.model_type} config keys {unknown}; "
            f"known keys include {sorted(key for key in current if not key.startswith('_'))[:40]}"
        )
    fixed = sorted(_FIXED_CONFIG_KEYS.intersection(overrides))
    if fixed:
        raise ValueError(
            f"student.init.config: {fixed} cannot be changed: the student keeps the teacher's architecture"
        )
    for key, value in overrides.items():
        _check_override_type(key, current[key], value)
    if "vocab_size" in overrides and int(overrides["vocab_size"]) < vocabulary:
        raise ValueError(
            f"student.init.config: vocab_size {overrides['vocab_size']} is smaller than the tokenizer's "
            f"{vocabulary} tokens"
        )
    values = {key: value for key, value in current.items() if key not in _FIXED_CONFIG_KEYS}
    # Values derived from overridden ones are derived again rather than kept from the teacher.
    if {"hidden_size", "num_attention_heads"} & overrides.keys() and "head_dim" not in overrides:
        values.pop("head_dim", None)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        values.pop("layer_types", None)
    values.update(overrides)
    try:
        config = type(teacher_config).from_dict(values)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"student.init.config {dict(overrides)} does not make a valid model: {exc}") from exc


def _check_override_type(key: str, current: object, value: object) -> None:
    if current is None:
        return
    if isinstance(current, bool):
        fits, kind = isinstance(value, bool), "true or false"
    elif isinstance(current, int):
        fits, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(current, float):
        fits, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(current, str):
        fits, kind = isinstance(value, str), "a string"
    else:
        raise ValueError(
            f"student.init.config: {key!r} holds a {type(current).__name__}, which cannot be overridden"
        )
    if not fits:
        raise ValueError(
            f"student.init.config: {key!r} must be {kind} (the teacher's is {current!r}); got {value!r}"
        )


# --- loading -------------------------------------------------------------------------------------------


def _pretrained(reference: str, locate: Locate) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = locate(reference, "student.init.pretrained")
    try:
        source = resolve_model_reference(local)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"student.init.pretrained: {exc}") from exc
    return _plain_model(source), load_tokenizer(source)


def _local_teacher(teacher: TeacherSpec, locate: Locate) -> ModelSource:
    if teacher.backend is not TeacherBackend.LOCAL:
        raise ValueError(
            "student.init pruneTeacherDepth, pruneTeacherWidth and config start from the teacher's "
            f"weights or config, which a teacher with backend `{teacher.backend.value}` does not have: "
            "use `pretrained`"
        )
    return resolve_model_reference(locate(teacher.model, "teacher.model"))


def _plain_model(source: ModelSource) -> PreTrainedModel:
    """The model at `source` in float32 on the CPU, in train mode, without a quantizer or quantization
    config (transformers keeps both on a model loaded from GGUF; with them it will not save a plain copy)."""
    model = load_model(source, device=torch.device("cpu"), dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.train()


def _decoder_layers(model: PreTrainedModel, option: str) -> nn.ModuleList:
    model_type = model.config.model_type
    if model_type not in PRUNABLE_MODEL_TYPES:
        raise ValueError(
            f"{option} works on Llama-family models ({', '.join(sorted(PRUNABLE_MODEL_TYPES))}); the teacher "
            f"is a {model_type!r} model: use `pretrained` or `config`"
        )
    return model.model.layers
