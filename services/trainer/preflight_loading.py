"""Finding and loading what the submit-time checks (`preflight`) look at: tokenizers and model configs,
never weights. A `pretrained` student in object storage (``s3://<bucket>/<prefix>``, a committed
artifact) is fetched without its weight files.

Loaded tokenizers and context lengths are kept by reference for the life of the process: the same
teacher is checked for every job, and reading a GGUF file's tokenizer takes seconds. A model that cannot
be found is a `ModelNotFound` naming the spec field; object storage that does not answer is an
`ObjectStoreError` (the check cannot be made, the spec is not at fault).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from pathlib import Path
from typing import BinaryIO

from transformers import AutoConfig, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from stillhouse.common.jobspec import DistillationJobSpec, TeacherBackend
from stillhouse.storage.artifacts import download_artifact
from stillhouse.storage.config import ObjectStoreSettings
from stillhouse.storage.objects import BucketNotFound, ObjectNotFound
from stillhouse.storage.open_store import open_object_store
from stillhouse.teacher.model_loading import ModelSource, resolve_model_reference
from stillhouse.trainer.preflight import (
    STUDENT_PRETRAINED,
    TEACHER_MODEL,
    TEACHER_TOKENIZER,
    Finding,
    ModelFacts,
    PreflightReport,
    check_models,
    derived_student,
)

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
    the files fetched from object storage."""

    def __init__(self, object_store: ObjectStoreSettings, folder: Path) -> None:
        self._object_store = object_store
        self._folder = folder
        self._lock = threading.Lock()
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._contexts: dict[str, int | None] = {}

    def check(self, spec: DistillationJobSpec) -> PreflightReport:
        """Every finding on `spec`: the models that cannot be found, else `check_models`'s."""
        with self._lock:
            try:
                teacher = self._teacher(spec)
                if spec.student.init.pretrained is not None:
                    reference = spec.student.init.pretrained
                    student = ModelFacts(
                        self._tokenizer(STUDENT_PRETRAINED, reference),
                        self._context(STUDENT_PRETRAINED, reference),
                    )
                else:
                    assert teacher is not None  # the schema lets only a local teacher derive a student
                    teacher_with_context = ModelFacts(
                        teacher.tokenizer, self._context(TEACHER_MODEL, spec.teacher.model)
                    )
                    student = derived_student(spec, teacher_with_context)
            except ModelNotFound as exc:
                return PreflightReport(violations=[exc.finding])
        return check_models(spec, teacher, student)

    def _teacher(self, spec: DistillationJobSpec) -> ModelFacts | None:
        teacher = spec.teacher
        if teacher.backend is TeacherBackend.LOCAL:
            return ModelFacts(self._tokenizer(TEACHER_MODEL, teacher.model), None)
        if teacher.tokenizer:
            return ModelFacts(self._tokenizer(TEACHER_TOKENIZER, teacher.tokenizer), None)
        return None

    def _tokenizer(self, field: str, reference: str) -> PreTrainedTokenizerBase:
        if reference not in self._tokenizers:
            folder, gguf_file = self._files(field, reference)
            try:
                self._tokenizers[reference] = AutoTokenizer.from_pretrained(
                    folder, gguf_file=gguf_file, local_files_only=True
                )
            except Exception as exc:  # the tokenizers library raises plain Exceptions for broken files
                raise ModelNotFound(
                    field, f"{_name(field)} {reference!r}: cannot load its tokenizer: {exc}"
                ) from exc
        return self._tokenizers[reference]

    def _context(self, field: str, reference: str) -> int | None:
        """max_position_embeddings of the model's config; None for a folder without a config."""
        if reference not in self._contexts:
            folder, gguf_file = self._files(field, reference)
            if gguf_file is not None:
                # transformers reads a GGUF config by parsing the whole file (seconds); the header is enough.
                try:
                    self._contexts[reference] = gguf_context_length(folder / gguf_file)
                except (OSError, ValueError, struct.error) as exc:
                    raise ModelNotFound(
                        field, f"{_name(field)} {reference!r}: cannot read its GGUF header: {exc}"
                    ) from exc
            elif not (folder / "config.json").is_file():
                self._contexts[reference] = None
            else:
                try:
                    config = AutoConfig.from_pretrained(folder, local_files_only=True)
                except (OSError, ValueError) as exc:
                    raise ModelNotFound(
                        field, f"{_name(field)} {reference!r}: cannot read its config: {exc}"
                    ) from exc
                self._contexts[reference] = getattr(config, "max_position_embeddings", None)
        return self._contexts[reference]

    def _files(self, field: str, reference: str) -> tuple[Path, str | None]:
        """The local folder (and GGUF file in it) a reference names; a tokenizer-only folder counts."""
        if reference.startswith("s3://"):
            return self._fetched(field, reference), None
        folder = Path(reference).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            return folder, None
        try:
            source: ModelSource = resolve_model_reference(reference)
        except FileNotFoundError as exc:
            raise ModelNotFound(field, f"{_name(field)}: {exc}") from exc
        return source.folder, source.gguf_file

    def _fetched(self, field: str, reference: str) -> Path:
        destination = self._folder / hashlib.sha256(reference.encode()).hexdigest()[:16]
        if destination.exists():
            return destination
        bucket, _, prefix = reference.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/")
        if not bucket or not prefix:
            raise ModelNotFound(field, f"{_name(field)} {reference!r} is not s3://<bucket>/<prefix>")
        store = open_object_store(self._object_store.model_copy(update={"bucket": bucket}))
        try:
            download_artifact(store, prefix, destination, include=lambda path: not is_weight_file(path))
        except (ObjectNotFound, BucketNotFound) as exc:
            raise ModelNotFound(
                field, f"{_name(field)} {reference!r}: no committed model artifact there ({exc})"
            ) from exc
        return destination


def _name(field: str) -> str:
    return field.removeprefix("spec.")


def gguf_context_length(path: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF file's metadata, read from its header."""
    with path.open("rb") as file:
        magic, _version, _tensors, entries = struct.unpack("<4sIQQ", file.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        architecture = None
        for _ in range(entries):
            key = _gguf_string(file)
            (kind,) = struct.unpack("<I", file.read(4))
            if kind == 8:
                value = _gguf_string(file)
                if key == "general.architecture":
                    architecture = value
            elif kind == 9:
                _skip_gguf_array(file)
            elif architecture is not None and key == f"{architecture}.context_length":
                if kind not in _GGUF_INTEGER_FORMATS:
                    raise ValueError(f"{path}: {key} is not an integer")
                return struct.unpack(_GGUF_INTEGER_FORMATS[kind], file.read(_GGUF_FIXED_SIZES[kind]))[0]
            else:
                file.seek(_GGUF_FIXED_SIZES[kind], 1)
    return None


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
