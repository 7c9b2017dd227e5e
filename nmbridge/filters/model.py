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
ACTIONS: tuple[Action, ...] = ("pass", "drop")

# Words other tools use for the two actions: refused (a config reads the same everywhere),
# with the word to write instead.
ACTION_SYNONYMS: dict[str, Action] = {
    "accept": "pass", "allow": "pass", "permit": "pass", "forward": "pass", "ok": "pass",
    "deny": "drop", "block": "drop", "discard": "drop", "reject": "drop", "refuse": "drop",
}


def action_hint(value: object) -> str:
    """What to write instead of `value` (a misspelt or foreign action), as "; ..." or ""."""
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ACTIONS:
        return f'; write it in lower case: "{word}"'
    if word in ACTION_SYNONYMS:
        extra = (" (nmbridge never answers a frame: it passes or drops it)"
                 if word in ("reject", "refuse") else "")
        return f'; write "{ACTION_SYNONYMS[word]}"{extra}'
    return ""


@dataclass(frozen=True)
class RuleConfig:
    """One rule: structured fields (ANDed) or a tcpdump expression, and an action."""

    name: str  # "rule N" when the file gives none: N counts from 1, as rule[N] in key paths
    action: Action
    fields: Mapping[str, object] = field(default_factory=dict)  # structured fields, raw
    pcap: str | None = None  # tcpdump expression
    keypath: str = ""  # where it is in the file: filter.NAME.rule[1] is the first rule


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
