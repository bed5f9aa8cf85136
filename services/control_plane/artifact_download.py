"""Where a browser gets one file of an artifact from: the URL the storage service presigned for it when
that is one a browser can follow (http or https), or the file itself when the object store is a local
folder (embedded mode, `file://` URLs), which the control plane then serves.

A local file is served only if it is the object the storage service named: its path, symlinks resolved,
must be the key's path under the store's folder, a regular file of the size the manifest recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit
from urllib.request import url2pathname

from stillhouse.common.api_models import ArtifactFileLink

BROWSER_SCHEMES = frozenset({"http", "https"})
_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


class DownloadRefused(Exception):
    """The file cannot be served; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Redirect:
    url: str


@dataclass(frozen=True)
class LocalFile:
    path: Path
    filename: str


def download_of(link: ArtifactFileLink, key: str) -> Redirect | LocalFile:
    """How to hand the file of `link` (the object `key`) to a browser."""
    parts = urlsplit(link.url)
    if parts.scheme in BROWSER_SCHEMES:
        return Redirect(link.url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise DownloadRefused(
            502, f"the storage service gave a {parts.scheme or 'schemeless'} URL, not a file"
        )
    return LocalFile(
        _checked_local_file(Path(url2pathname(parts.path)), key, link.size_bytes), safe_filename(link.path)
    )


def _checked_local_file(named: Path, key: str, size_bytes: int) -> Path:
    key_parts = PurePosixPath(key).parts
    if (
        not named.is_absolute()
        or len(named.parts) <= len(key_parts)
        or named.parts[-len(key_parts) :] != key_parts
    ):
        raise DownloadRefused(502, f"the storage service named {named}, which is not the object {key}")
    folder = Path(*named.parts[: -len(key_parts)])
    try:
        resolved = named.resolve(strict=True)
        expected = folder.resolve(strict=True).joinpath(*key_parts)
    except (OSError, RuntimeError):
        raise DownloadRefused(404, f"the object {key} is gone from the object store") from None
    if resolved != expected or not resolved.is_file():
        raise DownloadRefused(502, f"the object {key} is not a plain file of the object store")
    if resolved.stat().st_size != size_bytes:
        raise DownloadRefused(502, f"the object {key} is not the size its artifact's manifest recorded")
    return resolved


def safe_filename(path: str) -> str:
    """The file's name, for Content-Disposition: its last path segment, in letters, digits, '.', '-' and
    '_' only."""
    name = _UNSAFE_IN_FILENAME.sub("_", PurePosixPath(path).name).lstrip(".")
    return name or "file"
