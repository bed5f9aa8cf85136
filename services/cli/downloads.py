"""`stillhouse pull`: download an artifact's files from the URLs the API hands out, verified.

Each file goes to a hidden folder first and is checked against the size and sha256 of the artifact's
manifest; only a complete, verified artifact is moved into place, so an interrupted pull never leaves a
folder that looks like a whole model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A file could not be fetched or did not match its manifest; the message names it."""


def _fetch(url: str, destination: Path, http: httpx.Client) -> None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        shutil.copyfile(unquote(parsed.path), destination)
        return
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(f"cannot download from {url!r}: only http, https and file URLs are supported")
    with http.stream("GET", url) as response:
        if not response.is_success:
            raise DownloadError(f"GET {parsed.path} answered {response.status_code} {response.reason_phrase}")
        with destination.open("wb") as out:
            for chunk in response.iter_bytes(CHUNK_BYTES):
                out.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DownloadError(f"{folder} exists and is not an empty folder: choose another or remove it")


def download_files(
    files: list[dict[str, Any]], folder: Path, on_file: Callable[[str, int], None] = lambda path, size: None
) -> int:
    """Download every file (`path`, `sizeBytes`, `sha256`, `url`) into `folder`; the bytes downloaded."""
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    total = 0
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=True) as http:
            for record in files:
                relative = Path(record["path"])
                if relative.is_absolute() or ".." in relative.parts:
                    raise DownloadError(
                        f"refusing artifact file path {record['path']!r}: it leaves the folder"
                    )
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _fetch(record["url"], destination, http)
                except (OSError, httpx.HTTPError) as exc:
                    raise DownloadError(f"cannot download {record['path']}: {exc}") from exc
                size = destination.stat().st_size
                if size != int(record["sizeBytes"]):
                    raise DownloadError(
                        f"{record['path']}: {size} bytes, the manifest says {record['sizeBytes']}"
                    )
                if _sha256(destination) != record["sha256"]:
                    raise DownloadError(f"{record['path']}: sha256 differs from the manifest's")
                total += size
                on_file(record["path"], size)
        _check_target(folder)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total
