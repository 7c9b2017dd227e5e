"""The README cannot drift from the code: its config reference, filter fields, commands and
set-up commands are checked against what the program accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nmbridge import config
from nmbridge.cli import COMMANDS
from nmbridge.errors import ConfigError
from nmbridge.filters import FIELDS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAIR = "[[pair]]\nports = ['mem:a', 'mem:b']\n"


def block(tag: str) -> str:
    m = re.search(rf"<!-- {tag}:.*?-->(.*?)<!-- /{tag} -->", README, re.S)
    assert m, f"README has no {tag} block"
    return m.group(1)


def table_keys(tag: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", block(tag), re.M)


def known_keys(toml: str) -> list[str]:
    """The keys the loader accepts where `toml` puts an unknown key (from its own error)."""
    with pytest.raises(ConfigError) as e:
        config.loads(toml, "t")
    m = re.search(r"known keys: (.*)$", str(e.value))
    assert m, str(e.value)
    return m.group(1).split(", ")


def documented(section: str) -> set[str]:
    prefix = f"{section}."
    return {k[len(prefix):] for k in table_keys("config-reference") if k.startswith(prefix)}


def test_every_section_is_documented() -> None:
    sections = set(known_keys("zzzzqq = 1\n" + PAIR))
    readme = {k.split(".")[0].split("[")[0] for k in table_keys("config-reference")}
    assert sections == readme


@pytest.mark.parametrize("section", ["bridge", "log", "metrics", "control"])
def test_table_keys_match_the_loader(section: str) -> None:
    if section not in known_keys("zzzzqq = 1\n" + PAIR):
        pytest.fail(f"README documents [{section}] but the loader has no such section")
    assert set(known_keys(f"[{section}]\nzzzzqq = 1\n" + PAIR)) == documented(section)


def test_pair_keys_match_the_loader() -> None:
    got = set(known_keys("[[pair]]\nports = ['mem:a', 'mem:b']\nzzzzqq = 1\n"))
    assert got == documented("pair[]")


def test_filter_keys_match_the_loader() -> None:
    got = set(known_keys("[filter.f]\nzzzzqq = 1\n" + PAIR))
    doc = documented("filter.NAME")
    assert {k.split("[")[0] for k in doc} == got


def test_filter_fields_are_all_documented() -> None:
    assert set(table_keys("filter-fields")) == set(FIELDS)


def test_every_command_is_in_the_readme() -> None:
    for cmd in COMMANDS:
        assert f"`{cmd.name}" in README, cmd.name


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert first_block
    lines = [ln.split("#")[0].strip() for ln in first_block.group(1).splitlines() if ln.strip()]
    assert lines == ["./scripts/setup && nmbridge demo", "./scripts/test"]
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "etc").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    """The annotated examples in etc/ are configs `nmbridge check` accepts."""
    cfg = config.load(str(path))
    assert cfg.pairs
