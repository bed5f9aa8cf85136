"""The wheel (and so the services image, which installs it) holds every package of the sources:
pyproject.toml lists them one by one, and a package missing from the list fails only when installed."""

from __future__ import annotations

import tomllib

from .conftest import REPO


def test_every_package_under_services_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    (source,) = setuptools["package-dir"].values()
    root = REPO / source
    found = {
        ".".join(["stillhouse", *init.parent.relative_to(root).parts])
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - set(setuptools["packages"]) == set(), "packages missing from [tool.setuptools] packages"
    assert set(setuptools["packages"]) - found == set(), "listed packages that do not exist"
