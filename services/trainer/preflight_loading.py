"""Finding and loading what the submit-time checks (`preflight`) look at: tokenizers and model configs,
never weights. A model in object storage (``s3://<bucket>/<prefix>``) is fetched without its weight
files, into a cache of its own; a local path must lie under the models root (`ModelLocator`).

Loaded tokenizers and context lengths are kept by reference for the life of the process: the same
teacher is checked for every job, and reading a GGUF file's tokenizer takes seconds. A model that cannot
be found is a `ModelNotFound` naming the spec field; object storage that does not answer is an
`ObjectStoreError` (the check cannot be made, the spec is not at fault).
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from stillhouse.common.jobspec import DistillationJobSpec, TeacherBackend
from stillhouse.common.models.locator import ModelLocator
from stillhouse.common.models.references import ModelReferenceRefused
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.objects import BucketNotFound
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.preflight import (
    STUDENT_PRETRAINED,
    TEACHER_MODEL,
    TEACHER_TOKENIZER,
    Finding,
    ModelFacts,
    ModelShape,
    PreflightReport,
    check_models,
    derived_student,
)

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Byte sizes of the GGUF metadata value types that have a fixed size (by type number; 8 is a string,
# 9 an array), from the GGUF file format specification.
_GGUF_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTEGER_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
# Files of a Hugging Face model folder that hold weights, which the checks never need.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


class ModelNotFound(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.finding = Finding(field, message)


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


class ModelFactsLoader:
    """Tokenizers and context lengths by reference, cached (see the module docstring). `folder` keeps
    the files fetched from object storage; `models` says where local models may be."""

    def __init__(
        self, object_store: ObjectStoreSettings, folder: Path, models: ModelSettings | None = None
    ) -> None:
        models = models or ModelSettings()
        self._locator = ModelLocator(models.model_copy(update={"cache_dir": folder}), object_store)
        self._lock = threading.Lock()
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._shapes: dict[str, ModelShape] = {}

    def check(self, spec: DistillationJobSpec) -> PreflightReport:
        """Every finding on `spec`: the models that cannot be found, else `check_models`'s."""
        with self._lock:
            try:
                teacher = self._teacher(spec)
                if spec.student.init.pretrained is not None:
                    student = self._facts(STUDENT_PRETRAINED, spec.student.init.pretrained)
                else:
                    assert teacher is not None  # the schema lets only a local teacher derive a student
                    student = derived_student(spec, teacher)
            except ModelNotFound as exc:
                return PreflightReport(violations=[exc.finding])
        return check_models(spec, teacher, student)

    def _teacher(self, spec: DistillationJobSpec) -> ModelFacts | None:
        teacher = spec.teacher
        if teacher.backend is TeacherBackend.LOCAL:
            return self._facts(TEACHER_MODEL, teacher.model)
        if teacher.tokenizer:
            return self._facts(TEACHER_TOKENIZER, teacher.tokenizer)
        return None

    def _facts(self, field: str, reference: str) -> ModelFacts:
        return ModelFacts(self._tokenizer(field, reference), self._shape(field, reference))

    def _tokenizer(self, field: str, reference: str) -> PreTrainedTokenizerBase:
        if reference not in self._tokenizers:
            # transformers loads torch: the trainer service starts without it and loads it on first use.
            from stillhouse.common.models.model_loading import ModelSource, load_tokenizer

            folder, gguf_file = self._files(field, reference)
            try:
                self._tokenizers[reference] = load_tokenizer(ModelSource(folder, gguf_file))
            except Exception as exc:  # the tokenizers library raises plain Exceptions for broken files
                raise ModelNotFound(
                    field, f"{_name(field)} {reference!r}: cannot load its tokenizer: {exc}"
                ) from exc
        return self._tokenizers[reference]

    def _shape(self, field: str, reference: str) -> ModelShape:
        """The model's config, as far as the checks need it; empty for a folder without a config."""
        if reference not in self._shapes:
            folder, gguf_file = self._files(field, reference)
            try:
                if gguf_file is not None:
                    # transformers reads a GGUF config by parsing the whole file (seconds); the header
                    # is enough.
                    self._shapes[reference] = gguf_shape(folder / gguf_file)
                elif (folder / "config.json").is_file():
                    from transformers import AutoConfig  # see _tokenizer

                    config = AutoConfig.from_pretrained(folder, local_files_only=True)
                    self._shapes[reference] = ModelShape(
                        model_type=config.model_type,
                        context_length=getattr(config, "max_position_embeddings", None),
                        num_layers=getattr(config, "num_hidden_layers", None),
                        intermediate_size=getattr(config, "intermediate_size", None),
                    )
                else:
                    self._shapes[reference] = ModelShape()
            except (OSError, ValueError, struct.error) as exc:
                raise ModelNotFound(
                    field, f"{_name(field)} {reference!r}: cannot read its config: {exc}"
                ) from exc
        return self._shapes[reference]

    def _files(self, field: str, reference: str) -> tuple[Path, str | None]:
        """The local folder (and GGUF file in it) a reference names; a tokenizer-only folder counts."""
        try:
            reference = self._locator.locate(reference, field, include=lambda path: not is_weight_file(path))
        except ModelReferenceRefused as exc:
            raise ModelNotFound(field, f"{_name(field)}: {exc.message}") from exc
        except BucketNotFound as exc:
            raise ModelNotFound(field, f"{_name(field)}: {exc}") from exc
        folder = Path(reference).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            return folder, None
        from stillhouse.common.models.model_loading import (
            resolve_model_reference,  # imports torch: see _tokenizer
        )

        try:
            source = resolve_model_reference(reference)
        except FileNotFoundError as exc:
            raise ModelNotFound(field, f"{_name(field)}: {exc}") from exc
        return source.folder, source.gguf_file


def _name(field: str) -> str:
    return field.removeprefix("spec.")


def gguf_shape(path: Path) -> ModelShape:
    """The model's shape from a GGUF file's metadata (`general.architecture`, then
    `<architecture>.context_length`, `.block_count` and `.feed_forward_length`), read from its header."""
    wanted = {
        "context_length": "context_length",
        "block_count": "num_layers",
        "feed_forward_length": "intermediate_size",
    }
    found: dict[str, int] = {}
    architecture = None
    with path.open("rb") as file:
        magic, _version, _tensors, entries = struct.unpack("<4sIQQ", file.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        for _ in range(entries):
            key = _gguf_string(file)
            (kind,) = struct.unpack("<I", file.read(4))
            if kind == 8:
                value = _gguf_string(file)
                if key == "general.architecture":
                    architecture = value
            elif kind == 9:
                _skip_gguf_array(file)
            else:
                data = file.read(_GGUF_FIXED_SIZES[kind])
                name = key.removeprefix(f"{architecture}.")
                if architecture is not None and name in wanted and kind in _GGUF_INTEGER_FORMATS:
                    found[wanted[name]] = struct.unpack(_GGUF_INTEGER_FORMATS[kind], data)[0]
    return ModelShape(model_type=architecture, **found)


def _gguf_string(file: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", file.read(8))
    return file.read(length).decode("utf-8", errors="replace")


def _skip_gguf_array(file: BinaryIO) -> None:
    kind, count = struct.unpack("<IQ", file.read(12))
    if kind == 8:
        for _ in range(count):
            (length,) = struct.unpack("<Q", file.read(8))
            file.seek(length, 1)
    elif kind == 9:
        for _ in range(count):
            _skip_gguf_array(file)
    else:
        file.seek(_GGUF_FIXED_SIZES[kind] * count, 1)
