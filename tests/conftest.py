"""Shared test set-up: make the in-place build importable and mark root-only tests."""

from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs root (network namespaces, veth, AF_PACKET); CI runs as root")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip)
