"""The install, not the source tree: edgeseq's top-level folders are reachable only as edgeseq.*, never as
top-level packages that would shadow installed ones, and every installed package is pinned."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import edgeseq.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_subpackages_are_the_repository_folders():
    assert Path(edgeseq.kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.parametrize("name", ["kernels", "runtime", "quant", "exporters"])
def test_no_top_level_folder_answers_a_top_level_import(name):
    spec = importlib.util.find_spec(name)  # transformers' hub integration imports an installed `kernels`
    assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(ROOT / name), spec


def test_python_m_pytest_is_refused_with_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_layout.py")], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode != 0 and "python -P -m pytest" in r.stdout + r.stderr


def test_every_installed_package_is_pinned():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "lock.py"), "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
