"""Shared test set-up: make the in-place build importable and mark root-only tests."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

IS_ROOT = os.geteuid() == 0

# CI runs the property tests with a fixed seed per test: a landing never depends on the luck
# of the draw, and a failure there reproduces exactly. Elsewhere every run explores anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs root (network namespaces, veth, AF_PACKET); CI runs as root")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip)
