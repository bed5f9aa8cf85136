"""How a browser gets an artifact's file (`artifact_download`): redirected to a presigned http(s) URL,
served from a local object store only when the file is the object named, and a safe attachment name."""

from __future__ import annotations

from pathlib import Path

import pytest

from stillhouse.common.api_models import ArtifactFileLink
from stillhouse.control_plane.artifact_download import (
    DownloadRefused,
    LocalFile,
    Redirect,
    download_of,
    safe_filename,
)

KEY = "jobs/job-1/train/student/weights/model.bin"


def link(url: str, size: int = 4) -> ArtifactFileLink:
    return ArtifactFileLink(path="weights/model.bin", size_bytes=size, sha256="0" * 64, url=url)


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    path = tmp_path / "objects" / "stillhouse" / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(b"data")
    return path


def test_a_presigned_http_url_is_a_redirect():
    url = "https://s3.example.com/stillhouse/jobs/job-1/model.bin?X-Amz-Signature=abc"
    assert download_of(link(url), KEY) == Redirect(url)


def test_a_local_object_is_served_as_the_file_it_is(stored: Path):
    assert download_of(link(stored.as_uri()), KEY) == LocalFile(stored, "model.bin")


@pytest.mark.parametrize(
    ("url_of", "size", "status", "words"),
    [
        (lambda stored: "ftp://host/x", 4, 502, "ftp URL"),
        (lambda stored: f"file://otherhost{stored}", 4, 502, "not a file"),
        (lambda stored: stored.with_name("other.bin").as_uri(), 4, 502, "not the object"),
        (lambda stored: (stored.parent / "gone" / ".." / stored.name).as_uri(), 4, 502, "not the object"),
        (lambda stored: stored.with_name("absent.bin").as_uri().replace("absent", "model"), 5, 502, "size"),
    ],
    ids=["ftp", "remote-file-host", "another-object", "dot-dot", "size"],
)
def test_anything_else_is_refused(stored: Path, url_of, size, status, words):
    with pytest.raises(DownloadRefused, match=words) as refused:
        download_of(link(url_of(stored), size), KEY)
    assert refused.value.status == status


def test_a_missing_object_is_404(stored: Path):
    stored.unlink()
    with pytest.raises(DownloadRefused, match="gone") as refused:
        download_of(link(stored.as_uri()), KEY)
    assert refused.value.status == 404


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("a/b/config.json", "config.json"),
        ('we"ird\r\nname;.txt', "we_ird__name_.txt"),
        ("..", "file"),
        ("", "file"),
    ],
)
def test_attachment_names_are_safe(path, name):
    assert safe_filename(path) == name
