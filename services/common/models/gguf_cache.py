"""Plain Hugging Face copies of GGUF models, dequantized once and then reused by every process.

Reading a GGUF file means dequantizing every tensor and converting its tokenizer: about 15 s for the
embedded SmolLM2 on 2 CPU cores, and one job reads its teacher in many processes (the local teacher, the
checks before training, each training worker twice: for the student's layers and for on-policy scoring,
the evaluation). The first read saves what it converted under `<root>/<file stem>-<key>-<part>/`; later
reads load that folder, in about a second. The tokenizer has a copy of its own, so that what needs only
the tokenizer (the checks at submit) never waits for the weights. The key hashes the file's path, size
and modification time and the transformers version that converted it, so a changed file or converter
gets a new copy.

A copy is written into a staging folder and renamed into place whole: a reader never sees half of one.
When two processes write the same copy at once, the first rename wins and the other's staging folder is
removed. Where the root cannot be written, nothing is cached and the caller reads the GGUF file itself.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog
import transformers

from stillhouse.common.paths import stillhouse_home

log = structlog.get_logger(__name__)

STAGING_PREFIX = ".partial-"


def default_root() -> Path:
    return stillhouse_home() / "model-cache" / "gguf"


def copy_key(gguf: Path) -> str:
    """What identifies the copy of `gguf`: its resolved path, size and modification time, and the
    transformers version that converts it."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def plain_copy(gguf: Path, part: str, write: Callable[[Path], None], root: Path | None = None) -> Path | None:
    """The folder holding the plain copy of `part` of `gguf` (`model`: weights, config and tokenizer;
    `tokenizer`: the tokenizer alone, which needs no weights dequantized), made with `write(folder)` the
    first time; None when it could not be written (the caller then reads `gguf` itself)."""
    root = root or default_root()
    folder = root / f"{gguf.stem}-{copy_key(gguf)}-{part}"
    if folder.is_dir():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    except OSError as error:
        log.warning("GGUF copy not cached: its folder cannot be written", folder=str(root), error=str(error))
        return None
    try:
        write(staging)
        staging.rename(folder)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if folder.is_dir():  # another process renamed its copy into place first
            return folder
        log.warning("GGUF copy not cached", folder=str(folder), error=str(error))
        return None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
