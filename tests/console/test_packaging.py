"""The console needs no build step: its templates, scripts and style sheet ship in the wheel as package
data, which setuptools takes only when a pattern of pyproject.toml names them."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSOLE = REPO / "services" / "control_plane" / "console"


def shipped(path: Path, pattern: str) -> bool:
    """Whether setuptools' package-data `pattern` (relative to the package, '*' within one folder)
    takes `path`."""
    parts, wanted = path.parts, Path(pattern).parts
    return len(parts) == len(wanted) and all(map(fnmatchcase, parts, wanted))


def test_every_console_file_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["*"] + package_data["stillhouse.control_plane.console"]
    files = [
        path.relative_to(CONSOLE)
        for path in CONSOLE.rglob("*")
        if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts
    ]
    assert {"static/job.js", "static/style.css", "templates/job.html.j2"} <= {str(file) for file in files}
    assert [file for file in files if not any(shipped(file, pattern) for pattern in patterns)] == []
