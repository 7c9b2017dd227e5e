"""Filters: structured rules and tcpdump expressions compiled for fastfwd.

(Interface placeholder while the filter issue is being built: ``check_filter`` validates
a FilterConfig and raises FilterError; ``compile_filter`` returns an object with
``address`` (the C ``struct nmb_filter *``) and ``hits()``.)
"""

from __future__ import annotations

from nmbridge.filters.model import Action, FilterConfig, FilterError, RuleConfig

__all__ = ["Action", "FilterConfig", "FilterError", "RuleConfig", "check_filter"]


def check_filter(f: FilterConfig) -> None:
    """Raise FilterError when a rule of `f` cannot be compiled."""
    raise NotImplementedError("filters are being built (issue 5)")
