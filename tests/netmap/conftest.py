"""tests/netmap: the real netmap backend against the kernel module.

Runs only where /dev/netmap exists (the whole directory is skipped elsewhere, with the reason
in the summary) and needs no NIC: pipes and VALE ports are created on the fly.  Host-ring
tests run when NMBRIDGE_NETMAP_IFACE names an interface that may be put in netmap mode.
Runnable from a checkout against an installed wheel: ``pytest tests/netmap``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nmhelpers import NETMAP_DEVICE, Deadline

HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    if not os.path.exists(NETMAP_DEVICE):
        return (f"{NETMAP_DEVICE} does not exist: the netmap kernel module is not loaded "
                "(these tests need it; `modprobe netmap`)")
    if not os.access(NETMAP_DEVICE, os.R_OK | os.W_OK):
        return f"no read-write access to {NETMAP_DEVICE} (run as root)"
    return None


class _Unavailable(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(str(self.config.stash[_REASON]))


class _UnavailableFile(pytest.File):
    """Stands in for a test module that is not even imported (nmbridge's extension and the
    module may both be missing): one skipped item with the reason."""

    def collect(self) -> Iterator[pytest.Item]:
        yield _Unavailable.from_parent(self, name="netmap")


_REASON = pytest.StashKey[str]()


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    reason = _skip_reason()
    if reason is None or module_path.parent != HERE:
        return None
    parent.config.stash[_REASON] = reason
    return _UnavailableFile.from_parent(parent, path=module_path)


_counter = itertools.count()


@pytest.fixture
def uniq() -> Callable[[str], str]:
    """Names no other test (or process) uses: pipe parents, VALE switches and ports."""

    def make(prefix: str) -> str:
        return f"{prefix}{os.getpid()}n{next(_counter)}"

    return make


@pytest.fixture
def deadline() -> Iterator[Callable[[float], Deadline]]:
    yield Deadline
