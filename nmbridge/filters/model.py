"""What a filter is, as the configuration describes it (before compilation).

The config loader builds these from ``[filter.NAME]`` tables; the filter compiler turns a
:class:`FilterConfig` into a program fastfwd runs.  Field values in ``RuleConfig.fields`` are
exactly what the TOML file holds; :func:`nmbridge.filters.check_filter` validates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["pass", "drop"]


@dataclass(frozen=True)
class RuleConfig:
    """One rule: structured fields (ANDed) or a tcpdump expression, and an action."""

    name: str  # "rule 1" when the file gives none
    action: Action
    fields: Mapping[str, object] = field(default_factory=dict)  # structured fields, raw
    pcap: str | None = None  # tcpdump expression
    keypath: str = ""  # where it is in the file: filter.NAME.rule[0]


@dataclass(frozen=True)
class FilterConfig:
    """A named filter: rules tried in order, first match wins, else `default`."""

    name: str
    default: Action = "pass"
    rules: tuple[RuleConfig, ...] = ()
    keypath: str = ""  # filter.NAME


class FilterError(ValueError):
    """A rule or filter that cannot be compiled; `keypath` points into the config."""

    def __init__(self, keypath: str, value: object, reason: str) -> None:
        super().__init__(f"{keypath} = {value!r}: {reason}")
        self.keypath = keypath
        self.value = value
        self.reason = reason
