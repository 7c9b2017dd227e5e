"""The linters are part of the suite: ruff over the tree, mypy (strict) over the package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by scripts/setup")
def test_ruff() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy() -> None:
    done = run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_generated_c_is_tracked() -> None:
    tracked = run("git", "ls-files", "nmbridge").stdout.split()
    generated = [f for f in tracked if f.endswith(".c")]  # hand-written C lives in csrc/
    assert generated == []


def test_cython_rules() -> None:
    """No textual include/DEF/IF in Cython; every cdef function in fastfwd is noexcept nogil."""
    for pyx in (ROOT / "nmbridge").rglob("*.p[yx][xd]"):
        for n, line in enumerate(pyx.read_text().splitlines(), 1):
            stripped = line.strip()
            assert not stripped.startswith(("include ", "DEF ", "IF ", "ELIF ")), f"{pyx}:{n}: {line}"
    text = (ROOT / "nmbridge" / "fastfwd.pyx").read_text()
    hot = text.split("# the Python face")[0]
    signatures = re.findall(r"^cdef (?!class|extern|struct)[^\n(]*\([^)]*\)[^:]*:", hot, re.M)
    assert len(signatures) >= 8
    for sig in signatures:
        assert "noexcept nogil" in sig, sig
