"""What an installed (non-editable) hybridserve contains: every package under batch/ and serving/."""
import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent


def test_every_package_on_disk_is_in_the_distribution():
    """A package missing from pyproject.toml works in the editable checkout and fails installed."""
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = set(find_packages(REPO, include=found["include"]))
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("batch", "serving") for p in (REPO / top).rglob("__init__.py")}
    assert "batch.tools" in packaged and "serving.models" in packaged
    assert packaged == on_disk
