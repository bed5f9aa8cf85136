"""Where the local Ray head keeps its files: under the Stillhouse home, unless Ray's sockets would not fit."""

from __future__ import annotations

from pathlib import Path

from stillhouse.common.ray.settings import MAX_RAY_TEMP_DIR_CHARS, default_ray_temp_dir

# What Ray appends to its temp dir for the longest socket path, and the limit of a Unix socket path.
RAY_SOCKET_SUFFIX = "/session_2026-11-29_01-36-57_103230_31520/sockets/plasma_store"
UNIX_SOCKET_PATH_BYTES = 107


def test_a_short_home_keeps_ray_inside_it() -> None:
    assert default_ray_temp_dir(Path("/home/ana/.stillhouse")) == Path("/home/ana/.stillhouse/ray")


def test_a_long_home_moves_ray_to_a_short_folder_of_its_own(tmp_path: Path) -> None:
    long_home = tmp_path / ("deeply-nested-folder-" * 4) / "home"
    chosen = default_ray_temp_dir(long_home)
    assert len(str(chosen) + RAY_SOCKET_SUFFIX) <= UNIX_SOCKET_PATH_BYTES
    assert len(str(chosen)) <= MAX_RAY_TEMP_DIR_CHARS
    assert chosen == default_ray_temp_dir(long_home)
    assert chosen != default_ray_temp_dir(long_home / "other")
