"""What a model reference in a job spec may look like, checked without touching any file or server.

A model (`teacher.model` of a `local` teacher, `student.init.pretrained`) is named by one of:

- ``s3://<bucket>/<prefix>``: every object under ``<prefix>/`` is the model folder (a Hugging Face model
  or one ``.gguf`` file), downloaded once into the model cache (`weights_cache`);
- an absolute path: a folder or ``.gguf`` file, which must lie under the platform's models root (a
  mounted volume) when one is configured;
- ``<distribution>/<file>``: a model shipped inside an installed Python distribution.

The syntax rules here make a bad reference a 422 naming the field at submit; where the reference leads
(inside the models root, how big) is checked by `locator.ModelLocator` on the machine that loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stillhouse.common.field_refusals import FieldRefused
from stillhouse.common.objectstore.objects import S3_SCHEME

# S3 bucket naming rules: 3-63 lower-case letters, digits, '.' and '-', starting and ending alphanumeric.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_PREFIX_BYTES = 900  # leaves room under S3's 1024-byte key limit for the files inside the model folder


class ModelReferenceRefused(FieldRefused):
    """A model reference that may not be used; `field` is where the spec names it."""


@dataclass(frozen=True)
class S3ModelReference:
    bucket: str
    prefix: str  # without a trailing '/'

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"


def is_s3_reference(reference: str) -> bool:
    return reference.startswith(S3_SCHEME)


def parse_s3_reference(reference: str, field: str) -> S3ModelReference:
    """The bucket and prefix of ``s3://<bucket>/<prefix>``; ModelReferenceRefused naming `field`."""
    bucket, _, prefix = reference.removeprefix(S3_SCHEME).partition("/")
    prefix = prefix.removesuffix("/")
    if not BUCKET_PATTERN.fullmatch(bucket):
        raise ModelReferenceRefused(
            field,
            f"{reference!r}: the bucket must be 3-63 lower-case letters, digits, '.' and '-' "
            "(s3://<bucket>/<prefix>)",
        )
    if not prefix:
        raise ModelReferenceRefused(
            field, f"{reference!r} names a whole bucket: give the model's folder, s3://<bucket>/<prefix>"
        )
    _check_segments(reference, prefix.split("/"), field)
    if len(prefix.encode()) > MAX_PREFIX_BYTES:
        raise ModelReferenceRefused(field, f"the prefix is longer than {MAX_PREFIX_BYTES} bytes")
    return S3ModelReference(bucket, prefix)


def check_model_reference(reference: str, field: str) -> None:
    """Refuse a reference that is malformed whatever the machine loading it holds."""
    if any(ord(char) < 32 or char in "\\\x7f" for char in reference):
        raise ModelReferenceRefused(field, "control characters and backslashes are not allowed")
    if is_s3_reference(reference):
        parse_s3_reference(reference, field)
    elif "://" in reference:
        raise ModelReferenceRefused(
            field, f"{reference!r}: the only URL scheme for a model is s3:// (or give a local path)"
        )
    else:
        _check_segments(reference, reference.removeprefix("/").removesuffix("/").split("/"), field)


def _check_segments(reference: str, segments: list[str], field: str) -> None:
    if any(segment in ("", ".", "..") for segment in segments):
        raise ModelReferenceRefused(
            field, f"{reference!r}: '.', '..' and empty path segments are not allowed"
        )
