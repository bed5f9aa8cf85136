"""Where the local Ray head keeps its files: under the Stillhouse home, unless Ray's sockets would not fit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from stillhouse.common.ray.settings import MAX_RAY_TEMP_DIR_CHARS, LocalRaySettings, default_ray_temp_dir

# What Ray appends to its temp dir for its longest socket path (the largest pid Linux gives, the longest
# dashboard module's name), and the limit of a Unix socket path.
RAY_SOCKET_SUFFIX = "/r/session_2026-11-29_01-36-57_103230_4194304/sockets/dash_TaskEventsHead"
UNIX_SOCKET_PATH_BYTES = 107


def test_the_limit_leaves_room_for_rays_longest_socket_path() -> None:
    assert MAX_RAY_TEMP_DIR_CHARS + len(RAY_SOCKET_SUFFIX) == UNIX_SOCKET_PATH_BYTES


def test_a_short_home_keeps_ray_inside_it() -> None:
    assert default_ray_temp_dir(Path("/home/ana/.stillhouse")) == Path("/home/ana/.stillhouse/ray")


@pytest.mark.parametrize("extra", [1, 40])
def test_a_long_home_moves_ray_to_a_short_folder_of_its_own(extra: int) -> None:
    # `<home>/ray` one byte too long, and far too long.
    long_home = Path("/home/" + "h" * (MAX_RAY_TEMP_DIR_CHARS - len("/home//ray") + extra))
    chosen = default_ray_temp_dir(long_home)
    assert len(str(chosen) + RAY_SOCKET_SUFFIX) <= UNIX_SOCKET_PATH_BYTES
    assert chosen.parent != long_home
    assert chosen == default_ray_temp_dir(long_home)
    assert chosen != default_ray_temp_dir(long_home / "other")


def test_a_long_system_temp_dir_moves_rays_folder_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    # /var/tmp, a common TMPDIR, is already too long for `<temp dir>/stillhouse-ray-<digest>` to fit.
    monkeypatch.setattr(tempfile, "tempdir", "/var/tmp")
    long_home = Path("/home/" + "h" * MAX_RAY_TEMP_DIR_CHARS)
    chosen = default_ray_temp_dir(long_home)
    assert chosen.parent == Path("/tmp")
    assert len(str(chosen) + RAY_SOCKET_SUFFIX) <= UNIX_SOCKET_PATH_BYTES
    monkeypatch.setattr(tempfile, "tempdir", "/t")
    assert default_ray_temp_dir(long_home) == Path("/t") / chosen.name


def test_the_settings_default_fits_with_a_long_home_and_a_long_tmpdir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STILLHOUSE_HOME", str(tmp_path / ("h" * MAX_RAY_TEMP_DIR_CHARS)))
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    temp_dir = LocalRaySettings(auth_token_file=tmp_path / "token").temp_dir
    assert temp_dir.parent == Path("/tmp")
    assert len(str(temp_dir) + RAY_SOCKET_SUFFIX) <= UNIX_SOCKET_PATH_BYTES


def test_a_temp_dir_too_long_for_rays_sockets_is_refused_naming_the_limit(tmp_path: Path) -> None:
    too_long = Path("/tmp/" + "t" * (MAX_RAY_TEMP_DIR_CHARS - len("/tmp/") + 1))
    with pytest.raises(ValidationError) as refused:
        LocalRaySettings(temp_dir=too_long, auth_token_file=tmp_path / "token")
    assert refused.value.errors()[0]["loc"] == ("temp_dir",)
    assert f"{too_long} is {MAX_RAY_TEMP_DIR_CHARS + 1} bytes long; at most {MAX_RAY_TEMP_DIR_CHARS}" in str(
        refused.value
    )
    fits = too_long.with_name(too_long.name[1:])
    assert LocalRaySettings(temp_dir=fits, auth_token_file=tmp_path / "token").temp_dir == fits
