"""What an installed (non-editable) hybridserve contains: every package under batch/ and serving/."""
import shutil
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


def test_the_page_is_in_a_non_editable_install(tmp_path):
    """serving/web/static/ holds no package: only package-data puts the page into an install. setuptools'
    build_py (what a wheel is made of) on a copy, so nothing is written into the checkout."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for top in ("batch", "serving"):
        shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                            "--build-lib", str(tmp_path / "lib")], cwd=src, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    static = sorted(p.name for p in (REPO / "serving" / "web" / "static").iterdir())
    assert static and sorted(p.name for p in (tmp_path / "lib" / "serving" / "web" / "static").iterdir()) == static
    assert (tmp_path / "lib" / "serving" / "web" / "api.py").is_file()
