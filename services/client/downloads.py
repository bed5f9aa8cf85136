"""Downloading an artifact's files from the URLs the API hands out, verified and all-or-nothing.

Each file goes to a hidden staging folder beside the destination first and is checked against the size
and sha256 of the artifact's manifest; only a complete, verified artifact is moved into place, so an
interrupted pull never leaves a folder that looks like a whole model. `file://` URLs (a local object
store) are copied. The staging and checks are shared; `fetch` and `afetch` are the two transports.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlparse

import httpx

from stillhouse.client.errors import DownloadError
from stillhouse.common.api_models import ArtifactFileLink

CHUNK_BYTES = 1 << 20
# Presigned URLs go straight to object storage: no API token is sent there.
DOWNLOAD_TIMEOUT = httpx.Timeout(30.0, read=300.0)


class ArtifactStaging:
    """A staging folder for one artifact: `destination` of each file, `verify` it once fetched, then
    `commit` moves the whole folder into place. Leaving the `with` block removes whatever is left."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        _check_target(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
        self.total_bytes = 0

    def __enter__(self) -> ArtifactStaging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def destination(self, file: ArtifactFileLink) -> Path:
        relative = Path(file.path)
        if relative.is_absolute() or ".." in relative.parts:
            raise DownloadError(f"refusing artifact file path {file.path!r}: it leaves the folder")
        path = self.staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, file: ArtifactFileLink, path: Path) -> int:
        """The file's size once it matches the manifest; DownloadError naming it otherwise."""
        size = path.stat().st_size
        if size != file.size_bytes:
            raise DownloadError(f"{file.path}: {size} bytes, the manifest says {file.size_bytes}")
        if sha256_of(path) != file.sha256:
            raise DownloadError(f"{file.path}: sha256 differs from the manifest's")
        self.total_bytes += size
        return size

    def commit(self) -> Path:
        _check_target(self.folder)
        if self.folder.exists():
            self.folder.rmdir()
        os.replace(self.staging, self.folder)
        return self.folder


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DownloadError(f"{folder} exists and is not an empty folder: choose another or remove it")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _local_source(url: str) -> Path | None:
    """The file a `file://` URL names; None for http(s); DownloadError for any other scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(f"cannot download from {url!r}: only http, https and file URLs are supported")
    return None


def _refused(url: str, response: httpx.Response) -> DownloadError:
    return DownloadError(f"GET {urlparse(url).path} answered {response.status_code} {response.reason_phrase}")


def fetch(http: httpx.Client, file: ArtifactFileLink, destination: Path) -> None:
    try:
        if (source := _local_source(file.url)) is not None:
            shutil.copyfile(source, destination)
            return
        with http.stream("GET", file.url) as response:
            if not response.is_success:
                raise _refused(file.url, response)
            with destination.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    out.write(chunk)
    except (OSError, httpx.HTTPError) as exc:
        raise DownloadError(f"cannot download {file.path}: {exc}") from exc


async def afetch(http: httpx.AsyncClient, file: ArtifactFileLink, destination: Path) -> None:
    try:
        if (source := _local_source(file.url)) is not None:
            await asyncio.to_thread(shutil.copyfile, source, destination)
            return
        async with http.stream("GET", file.url) as response:
            if not response.is_success:
                raise _refused(file.url, response)
            with destination.open("wb") as out:
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    out.write(chunk)
    except (OSError, httpx.HTTPError) as exc:
        raise DownloadError(f"cannot download {file.path}: {exc}") from exc
