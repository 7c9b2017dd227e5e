"""The configuration file: what loads, what it becomes, and one test per distinct error."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmbridge import config
from nmbridge.backends import PortSpec
from nmbridge.config import BridgeConfig, Config, LogConfig, PairConfig
from nmbridge.errors import ConfigError
from nmbridge.filters.model import FilterConfig, FilterError, RuleConfig

ROOT = Path(__file__).resolve().parents[2]
PAIR = '[[pair]]\nports = ["mem:a", "mem:b"]\n'


def load(text: str) -> Config:
    return config.loads(text, "b.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(text)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- what loads ------------------------------------------------------------------------


def test_minimal_config_gets_every_default() -> None:
    c = load(PAIR)
    assert c.path == "b.toml"
    assert c.bridge == BridgeConfig()
    assert c.log == LogConfig()
    assert c.filters == {}
    assert c.pairs == (PairConfig("pair1", PortSpec("mem", "a"), PortSpec("mem", "b"), keypath="pair[1]"),)


def test_every_key_is_read() -> None:
    c = load("""
[bridge]
name = "edge"
backend = "mem"
burst = 64
poll_timeout_ms = 50
stats_interval = 2
ring_slots = 256
buf_size = 4096
link_setup = false
[log]
level = "debug"
format = "json"
[filter.f]
default = "drop"
[[filter.f.rule]]
action = "pass"
dst_port = 22
[[filter.f.rule]]
name = "arp"
action = "pass"
pcap = "arp"
[[pair]]
name = "x"
ports = ["a", "mem:b"]
direction = "b-to-a"
filter_b_to_a = "f"
link_setup = true
""")
    assert c.bridge == BridgeConfig("edge", "mem", 64, 50, 2.0, 256, 4096, False)
    assert isinstance(c.bridge.stats_interval, float)
    assert c.log == LogConfig("debug", "json")
    assert c.filters["f"] == FilterConfig(
        "f", "drop", (RuleConfig("rule 1", "pass", {"dst_port": 22}, None, "filter.f.rule[1]"),
                      RuleConfig("arp", "pass", {}, "arp", "filter.f.rule[2]")), "filter.f")
    (p,) = c.pairs
    assert (p.name, p.a, p.b, p.direction, p.link_setup) == ("x", PortSpec("mem", "a"), PortSpec("mem", "b"),
                                                            "b_to_a", True)
    assert p.filters == {"b_to_a": "f"}


def test_pair_link_setup_defaults_to_the_bridge_s() -> None:
    c = load('[bridge]\nlink_setup = false\n' + PAIR)
    assert c.pairs[0].link_setup is False


def test_pair_filter_applies_to_the_directions_that_forward() -> None:
    c = load('[filter.f]\n[[pair]]\nports = ["mem:a", "mem:b"]\nfilter = "f"\ndirection = "a-to-b"\n')
    assert c.pairs[0].filters == {"a_to_b": "f"}
    c = load('[filter.f]\n[[pair]]\nports = ["mem:a", "mem:b"]\nfilter = "f"\n')
    assert c.pairs[0].filters == {"a_to_b": "f", "b_to_a": "f"}


def test_default_names_count_from_one() -> None:
    c = load(PAIR + '[[pair]]\nports = ["mem:c", "mem:d"]\n[filter.f]\n[[filter.f.rule]]\naction = "drop"\n')
    assert [p.name for p in c.pairs] == ["pair1", "pair2"]
    assert c.filters["f"].rules[0].name == "rule 1"


@pytest.mark.parametrize("name", ["bridge.toml", "mem.toml"])
def test_shipped_examples_load_and_round_trip(name: str) -> None:
    c = config.load(ROOT / "etc" / name)
    assert c.pairs
    assert config.from_dict(c.as_dict(), c.path) == c


def test_round_trip_keeps_filters_and_directions() -> None:
    c = load('[filter.f]\ndefault = "drop"\n[[filter.f.rule]]\naction = "pass"\npcap = "arp"\n'
             '[[pair]]\nports = ["mem:a", "mem:b"]\nfilter_a_to_b = "f"\n')
    assert config.from_dict(c.as_dict(), c.path) == c


def test_bare_port_uses_the_default_backend_and_matches_the_prefixed_one() -> None:
    message = error('[bridge]\nbackend = "mem"\n[[pair]]\nports = ["mem:a", "b"]\n'
                    '[[pair]]\nports = ["a", "mem:c"]\n')
    assert message == ('b.toml:6: pair[2].ports[1] = "a": mem:a is already in pair "pair1" '
                       "(pair[1].ports[1]); an interface belongs to one pair only")


# --- errors: the file ------------------------------------------------------------------


def test_syntax_error_names_line_and_column() -> None:
    assert error("[bridge]\nburst = = 3\n") == "b.toml:2:9: Invalid value"


def test_table_declared_twice_is_a_syntax_error() -> None:
    assert error("[bridge]\n[bridge]\n" + PAIR).startswith("b.toml:2:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        config.load(tmp_path / "nope.toml")


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "b.toml"
    f.write_bytes(b"[bridge]\nname = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(f)


# --- errors: keys ----------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_and_names_its_line() -> None:
    assert error("[bridge]\nname = 'x'\nbrust = 256\n" + PAIR) == (
        'b.toml:3: bridge.brust = 256: unknown key; did you mean "burst"?')


def test_unknown_key_with_nothing_close_lists_the_known_ones() -> None:
    assert error("[log]\ncolour = true\n" + PAIR) == (
        "b.toml:2: log.colour = true: unknown key; known keys: level, format")


def test_unknown_table() -> None:
    assert error("[brigde]\nburst = 1\n" + PAIR).startswith(
        'b.toml:1: brigde = {burst = 1}: unknown key; did you mean "bridge"?')


def test_unknown_key_in_the_second_pair_points_at_that_pair() -> None:
    text = PAIR + '\n[[pair]]\nports = ["mem:c", "mem:d"]\nfliter = "x"\n'
    assert error(text) == 'b.toml:6: pair[2].fliter = "x": unknown key; did you mean "filter"?'


def test_unknown_key_in_a_filter() -> None:
    assert error('[filter.f]\ndefualt = "pass"\n' + PAIR) == (
        'b.toml:2: filter.f.defualt = "pass": unknown key; did you mean "default"?')


# --- errors: types and ranges ----------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ('burst = "256"', 'bridge.burst = "256": must be an integer, not a string'),
    ("burst = 256.0", "bridge.burst = 256.0: must be an integer, not a number"),
    ("burst = true", "bridge.burst = true: must be an integer, not a boolean"),
    ('link_setup = "yes"', 'bridge.link_setup = "yes": must be true or false, not a string'),
    ('stats_interval = "10"', 'bridge.stats_interval = "10": must be a number, not a string'),
    ("name = 3", "bridge.name = 3: must be a string, not an integer"),
])
def test_wrong_type(line: str, expected: str) -> None:
    assert error(f"[bridge]\n{line}\n" + PAIR) == f"b.toml:2: {expected}"


def test_section_that_is_not_a_table() -> None:
    assert error('bridge = "br0"\n' + PAIR) == 'b.toml:1: bridge = "br0": must be a table, not a string'


@pytest.mark.parametrize(("line", "reason"), [
    ("burst = 0", "must be from 1 to 8192"),
    ("burst = 8193", "must be from 1 to 8192"),
    ("poll_timeout_ms = 0", "must be from 1 to 60000"),
    ("stats_interval = -1", "must be from 0 to 86400"),
    ("ring_slots = 32", "must be from 64 to 16384"),
    ("ring_slots = 1000", "must be a power of two (64, 128, ... 16384)"),
    ("buf_size = 128", "must be from 256 to 65536"),
    ("buf_size = 1000", "must be a multiple of 64"),
    ('name = ""', "must not be empty"),
])
def test_out_of_range(line: str, reason: str) -> None:
    key, _, value = line.partition(" = ")
    assert error(f"[bridge]\n{line}\n" + PAIR) == f"b.toml:2: bridge.{key} = {value}: {reason}"


def test_bad_backend() -> None:
    assert error('[bridge]\nbackend = "dpdk"\n' + PAIR) == (
        'b.toml:2: bridge.backend = "dpdk": must be one of auto, afpacket, afxdp, mem, netmap')


def test_bad_log_level_suggests() -> None:
    assert error('[log]\nlevel = "warn"\n' + PAIR) == (
        'b.toml:2: log.level = "warn": must be one of debug, info, warning, error; did you mean "warning"?')


def test_bad_log_format() -> None:
    assert error('[log]\nformat = "xml"\n' + PAIR) == (
        'b.toml:2: log.format = "xml": must be one of auto, json, console')


# --- errors: pairs ---------------------------------------------------------------------


def test_no_pair() -> None:
    assert error("[bridge]\n") == "b.toml: pair: no [[pair]]: a bridge needs at least one pair of ports"


def test_pair_written_as_a_table() -> None:
    assert error('[pair]\nports = ["mem:a", "mem:b"]\n') == (
        "b.toml:1: pair: write [[pair]] (an array of tables, one per pair), not [pair]")


def test_pair_without_ports() -> None:
    assert error('[[pair]]\nname = "x"\n') == (
        'b.toml:1: pair[1].ports: required: two ports, e.g. ["afpacket:eth1", "eth2"]')


@pytest.mark.parametrize("ports", ['["mem:a"]', '"mem:a"', '["mem:a", "mem:b", "mem:c"]'])
def test_ports_not_two(ports: str) -> None:
    assert error(f"[[pair]]\nports = {ports}\n").startswith("b.toml:2: pair[1].ports = ")
    assert error(f"[[pair]]\nports = {ports}\n").endswith(": must be an array of two ports")


def test_port_not_a_string() -> None:
    assert error('[[pair]]\nports = ["mem:a", 3]\n') == (
        'b.toml:2: pair[1].ports[2] = 3: must be a string like "afpacket:eth1", not an integer')


def test_port_with_an_unknown_backend() -> None:
    assert error('[[pair]]\nports = ["mem:a", "dpdk:eth1"]\n').startswith(
        "b.toml:2: pair[1].ports[2] = \"dpdk:eth1\": unknown backend 'dpdk'")


def test_port_name_the_backend_refuses() -> None:
    assert error('[[pair]]\nports = ["mem:a", "mem:b?rx=sometimes"]\n') == (
        "b.toml:2: pair[1].ports[2] = \"mem:b?rx=sometimes\": mem option rx='sometimes': "
        "use one of queue, source, none")


def test_same_port_twice_in_a_pair() -> None:
    assert error('[[pair]]\nports = ["mem:a", "mem:a?rx=source"]\n') == (
        'b.toml:2: pair[1].ports[2] = "mem:a?rx=source": mem:a is this pair\'s other port too; '
        "a pair needs two different ports")


def test_interface_in_two_pairs() -> None:
    assert error(PAIR + '[[pair]]\nname = "second"\nports = ["mem:c", "mem:b"]\n') == (
        'b.toml:5: pair[2].ports[2] = "mem:b": mem:b is already in pair "pair1" (pair[1].ports[2]); '
        "an interface belongs to one pair only")


def test_duplicate_pair_names() -> None:
    text = ('[[pair]]\nname = "x"\nports = ["mem:a", "mem:b"]\n'
            '[[pair]]\nname = "x"\nports = ["mem:c", "mem:d"]\n')
    assert error(text) == 'b.toml:5: pair[2].name = "x": pair[1] has this name already'


def test_bad_pair_name() -> None:
    assert error('[[pair]]\nname = "my pair"\nports = ["mem:a", "mem:b"]\n') == (
        "b.toml:2: pair[1].name = \"my pair\": a pair name must be 1-64 letters, digits, '_' or '-'")


def test_bad_direction() -> None:
    assert error(PAIR + 'direction = "a->b"\n') == (
        'b.toml:3: pair[1].direction = "a->b": must be one of both, a_to_b, b_to_a '
        '(a-to-b and b-to-a are read the same); did you mean "a_to_b"?')


def test_unknown_filter_suggests_a_defined_one() -> None:
    assert error('[filter.no-ssh]\n' + PAIR + 'filter = "nossh"\n') == (
        'b.toml:4: pair[1].filter = "nossh": no such filter; did you mean "no-ssh"?')


def test_unknown_filter_when_none_is_defined() -> None:
    assert error(PAIR + 'filter_b_to_a = "x"\n') == (
        'b.toml:3: pair[1].filter_b_to_a = "x": no such filter (no [filter.NAME] in the file)')


def test_filter_and_per_direction_filter_together() -> None:
    assert error('[filter.f]\n' + PAIR + 'filter = "f"\nfilter_a_to_b = "f"\n') == (
        'b.toml:5: pair[1].filter_a_to_b = "f": set filter (both directions) or filter_a_to_b/filter_b_to_a, '
        "not both")


def test_filter_for_a_direction_that_does_not_forward() -> None:
    assert error('[filter.f]\n' + PAIR + 'direction = "a-to-b"\nfilter_b_to_a = "f"\n') == (
        'b.toml:5: pair[1].filter_b_to_a = "f": direction is "a_to_b": nothing is forwarded b to a')


# --- errors: filters -------------------------------------------------------------------


def test_bad_filter_name() -> None:
    assert error('[filter."no ssh"]\n' + PAIR) == (
        "b.toml:1: filter.no ssh: a filter name must be 1-64 letters, digits, '_' or '-'")


def test_filter_that_is_not_a_table() -> None:
    assert error("[filter]\nf = 3\n" + PAIR) == "b.toml:2: filter.f = 3: must be a table, not an integer"


def test_bad_default_action() -> None:
    assert error('[filter.f]\ndefault = "reject"\n' + PAIR) == (
        'b.toml:2: filter.f.default = "reject": must be "pass" or "drop"; write "drop" '
        "(nmbridge never answers a frame: it passes or drops it)")


def test_rules_not_an_array_of_tables() -> None:
    assert error('[filter.f]\nrule = "drop all"\n' + PAIR) == (
        'b.toml:2: filter.f.rule = "drop all": must be an array of tables, not a string')


def test_bad_rule_action_suggests() -> None:
    assert error('[filter.f]\n[[filter.f.rule]]\naction = "dorp"\n' + PAIR) == (
        'b.toml:3: filter.f.rule[1].action = "dorp": must be "pass" or "drop"; did you mean "drop"?')


def test_rule_without_action() -> None:
    assert error('[filter.f]\n[[filter.f.rule]]\ndst_port = 22\n' + PAIR) == (
        'b.toml:2: filter.f.rule[1].action: required: "pass" or "drop"')


def test_rule_with_a_misspelled_action() -> None:
    assert error('[filter.f]\n[[filter.f.rule]]\nactoin = "drop"\n' + PAIR) == (
        'b.toml:2: filter.f.rule[1].action: required: "pass" or "drop" (is "actoin" a misspelling?)')


def test_rule_with_pcap_and_fields() -> None:
    text = '[filter.f]\n[[filter.f.rule]]\naction = "drop"\npcap = "arp"\ndst_port = 22\n' + PAIR
    assert error(text) == ("b.toml:5: filter.f.rule[1].dst_port = 22: a rule has structured fields or pcap, "
                           "not both; write two rules")


def test_rule_with_empty_pcap() -> None:
    assert error('[filter.f]\n[[filter.f.rule]]\naction = "drop"\npcap = " "\n' + PAIR) == (
        'b.toml:4: filter.f.rule[1].pcap = " ": must not be empty (leave pcap out to match every frame)')


def test_duplicate_rule_names() -> None:
    text = ('[filter.f]\n[[filter.f.rule]]\nname = "r"\naction = "drop"\n'
            '[[filter.f.rule]]\nname = "r"\naction = "pass"\n' + PAIR)
    assert error(text) == 'b.toml:6: filter.f.rule[2].name = "r": rule[1] has this name already'


def test_filter_check_errors_become_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the filter compiler refuses is reported at its key path, with its line."""
    def refuse(f: FilterConfig) -> None:
        raise FilterError(f"{f.rules[0].keypath}.dst_port", 70000, "a port is 0 to 65535")
    monkeypatch.setattr(config, "check_filter", refuse)
    assert error('[filter.f]\n[[filter.f.rule]]\naction = "drop"\ndst_port = 70000\n' + PAIR) == (
        "b.toml:4: filter.f.rule[1].dst_port = 70000: a port is 0 to 65535")


def test_filters_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[FilterConfig] = []
    monkeypatch.setattr(config, "check_filter", seen.append)
    c = load('[filter.f]\n[filter.g]\n' + PAIR)
    assert seen == [c.filters["f"], c.filters["g"]]


def test_error_without_source_text_has_no_line() -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict({"bridge": {"burst": 0}, "pair": [{"ports": ["mem:a", "mem:b"]}]}, "d")
    assert str(e.value) == "d: bridge.burst = 0: must be from 1 to 8192"
