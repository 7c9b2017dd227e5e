"""Filters: structured rules and tcpdump expressions compiled for fastfwd.

``check_filter(f)`` validates a :class:`FilterConfig` (raising :class:`FilterError` whose
keypath names the filter, the rule and the field, e.g. ``filter.web.rule[2].dst_port``, the
second rule: numbers count from 1) and returns warnings;
``compile_filter(f)`` returns a :class:`CompiledFilter` whose ``address`` is the C
``struct nmb_filter *`` to give ``Forwarder.set_filter``.  ``FIELDS`` documents every
structured field (the exact semantics: ``/work/shared/filter-semantics.md``).
"""

from __future__ import annotations

from nmbridge.filters.compiler import CompiledFilter, rule_specs
from nmbridge.filters.fields import FIELDS
from nmbridge.filters.lint import FilterWarning, lint
from nmbridge.filters.model import Action, FilterConfig, FilterError, RuleConfig

__all__ = ["FIELDS", "Action", "CompiledFilter", "FilterConfig", "FilterError", "FilterWarning",
           "RuleConfig", "check_filter", "compile_filter"]


def check_filter(f: FilterConfig) -> list[FilterWarning]:
    """Raise FilterError when a rule of `f` cannot be compiled (pcap rules are compiled by
    libpcap here, so its message is part of the error); else return the warnings about rules
    that can never match or never decide (``nmbridge.filters.lint``)."""
    return lint(f, rule_specs(f))


def compile_filter(f: FilterConfig) -> CompiledFilter:
    """Compile `f` for the fast path; raises FilterError as check_filter does."""
    return CompiledFilter(f)
