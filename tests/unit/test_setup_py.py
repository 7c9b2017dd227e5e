"""setup.py never leaves an extension out silently: a listed source that is missing stops the
build with an error naming it (a build from a copy of the tree without csrc/ once "succeeded"
with no extension at all)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tree_copy(tmp_path: Path) -> Path:
    """setup.py, pyproject.toml, README.md and the sources a build reads, in a fresh directory."""
    dst = tmp_path / "src"
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, dst / name)
    for d in ("nmbridge", "csrc"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__")
                        if d == "nmbridge" else None)
    return dst


def run_setup(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("missing", ["csrc/afpacket.c", "csrc/umem.c", "nmbridge/filters/engine.pyx"])
def test_a_missing_source_is_a_build_error_naming_it(tmp_path: Path, missing: str) -> None:
    src = tree_copy(tmp_path)
    (src / missing).unlink()
    done = run_setup(src)
    assert done.returncode != 0
    assert f"missing from the build tree: {missing}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_tree_without_csrc_names_every_c_file(tmp_path: Path) -> None:
    src = tree_copy(tmp_path)
    shutil.rmtree(src / "csrc")
    done = run_setup(src)
    assert done.returncode != 0
    listed = [c.name for c in sorted((ROOT / "csrc").glob("*.c"))
              if f'"{c.name}"' in (ROOT / "setup.py").read_text()]
    assert listed
    for name in listed:
        assert f"csrc/{name}" in done.stderr, (name, done.stderr)
