"""The Vagrant lab, booted for real: lab/smoke.sh brings up left, bridge and right under libvirt
(KVM where it works, plain qemu otherwise), pings across nmbridge, stops and starts it, applies
a filter with `nmbridge reload`, and destroys the VMs. Its output (each step and its duration)
goes straight to the terminal, so the CI log shows the lab.

Root only. Outside CI, NMBRIDGE_LAB=0 skips it (quick iterations: it takes 10-20 minutes under
emulation), as does a host without vagrant/libvirt. In CI (CI=true) nothing skips it: a missing
tool or a missing root is a failure, reported by lab/smoke.sh itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "lab" / "smoke.sh"
TOOLS = ("vagrant", "virsh", "qemu-system-x86_64", "mmdebstrap")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def test_the_lab_boots_and_bridges(pytestconfig: pytest.Config) -> None:
    if not in_ci():
        if os.environ.get("NMBRIDGE_LAB", "1") == "0":
            pytest.skip("NMBRIDGE_LAB=0: the Vagrant lab is not booted (CI always boots it)")
        if os.geteuid() != 0:
            pytest.skip("the Vagrant lab needs root (libvirt, VMs)")
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup installs them)")
    env = {k: v for k, v in os.environ.items() if k != "NMBRIDGE_LAB_KEEP"}
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():  # the smoke's own log, live, uncaptured
        print(f"\n{SMOKE.relative_to(ROOT)}: the Vagrant lab, for real", flush=True)
        done = subprocess.run([str(SMOKE)], cwd=ROOT, env=env, timeout=45 * 60, check=False)
    assert done.returncode == 0, f"lab/smoke.sh failed (exit {done.returncode}); its log is above"
