"""Fixtures shared by the unit tests; this folder's helper modules are importable."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nmbridge import logs

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Whatever a test does to logging (main() configures it), the root logger is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def log_lines(restore_logging: None) -> Iterator[io.StringIO]:
    """Logs as JSON lines in a buffer."""
    out = io.StringIO()
    logs.configure("json", "info", out)
    yield out
