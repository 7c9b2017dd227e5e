"""The netmap backend end to end against a fake /dev/netmap (tests/unit/fakenetmap): a
preloaded library answers the ioctls on a regular file from the ABI facts, so open, the
shared mapping per memory region, ring ranges, syncs, errors and close run on any machine.
The real module is exercised by tests/netmap where it exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nmbridge

HERE = Path(__file__).resolve().parent / "fakenetmap"
INCLUDE = Path(__file__).resolve().parents[2] / "nmbridge" / "include"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_backend_against_fake_kernel(tmp_path: Path) -> None:
    lib = tmp_path / "fake_netmap.so"
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{INCLUDE}",
                    str(HERE / "fake_netmap.c"), "-o", str(lib), "-ldl"], check=True)
    dev = tmp_path / "netmap"
    with dev.open("wb") as f:
        f.truncate(4 << 20)
    # the nmbridge this test imported (a checkout's in-place build or an installed wheel)
    where = str(Path(nmbridge.__file__).parents[1])
    path = os.pathsep.join(filter(None, [where, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, LD_PRELOAD=str(lib), NMB_FAKE_DEV=str(dev), PYTHONPATH=path)
    done = subprocess.run([sys.executable, str(HERE / "scenario.py")], env=env, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
