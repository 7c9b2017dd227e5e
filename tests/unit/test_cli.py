"""The ``nmbridge`` command: exit statuses, one-line errors, help, the subcommand registry."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from nmbridge import __version__, cli, config

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_TOML = str(ROOT / "etc" / "bridge.toml")


pytestmark = pytest.mark.usefixtures("restore_logging")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "b.toml"
    f.write_text(text)
    return str(f)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "version") == (0, f"nmbridge {__version__}\n", "")


def test_check_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "check", "-c", BRIDGE_TOML)
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"{BRIDGE_TOML}: ok"
    assert "pair lan: afpacket:veth1 <-> afpacket:veth2; filters: a_to_b: no-ssh, b_to_a: no-ssh" in out
    assert "pair mirror: " in out and "filter no-ssh: 2 rules, default pass" in out


def test_check_a_typo_is_one_line_with_key_path_and_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = Path(BRIDGE_TOML).read_text().replace("\nburst = 1024\n", "\nbrust = 1024\n")
    f = write(tmp_path, text)
    line = text.splitlines().index("brust = 1024") + 1
    assert run(capsys, "check", "-c", f) == (
        78, "", f'nmbridge: {f}:{line}: bridge.brust = 1024: unknown key; did you mean "burst"?\n')


def test_check_a_syntax_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = write(tmp_path, "[bridge\n")
    status, out, err = run(capsys, "check", "-c", f)
    assert (status, out) == (78, "")
    assert err.startswith(f"nmbridge: {f}:1:8: ") and err.count("\n") == 1


def test_check_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run(capsys, "check", "-c", str(tmp_path / "none.toml"))
    assert status == 78 and "cannot read" in err and err.count("\n") == 1


def test_run_config_error_is_78(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = write(tmp_path, '[[pair]]\nports = ["mem:a", "mem:a"]\n')
    status, out, err = run(capsys, "run", "-c", f)
    assert (status, out) == (78, "")
    assert "a pair needs two different ports" in err and err.count("\n") == 1


def test_run_port_error_is_1_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = write(tmp_path, '[[pair]]\nname = "lan"\nports = ["mem:a", "mem:b?rx=source&frame_len=9000"]\n')
    status, _, err = run(capsys, "run", "-c", f)
    assert status == 1
    assert err.startswith("nmbridge: pair lan: port mem:b?rx=source&frame_len=9000: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_interrupted_is_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path: str) -> config.Config:
        raise KeyboardInterrupt
    monkeypatch.setattr(config, "load", interrupted)
    assert run(capsys, "check", "-c", BRIDGE_TOML) == (130, "", "nmbridge: interrupted\n")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_log_options_before_or_after_the_command_win_over_the_file() -> None:
    parser = cli.build_parser()
    cfg = config.loads('[log]\nlevel = "error"\nformat = "console"\n[[pair]]\nports = ["mem:a", "mem:b"]\n')
    for argv in (["--log-level", "debug", "run", "-c", "x"], ["run", "-c", "x", "--log-level", "debug"]):
        args = parser.parse_args(argv)
        assert (args.log_level, args.log_format) == ("debug", None)
        cli.configure_logs(args, cfg)
        assert logging.getLogger().level == logging.DEBUG
    cli.configure_logs(parser.parse_args(["run", "-c", "x"]), cfg)
    assert logging.getLogger().level == logging.ERROR


def test_a_subcommand_is_one_entry(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("word")

    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.word}")
        return 3
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, cli.Command("hello", "say hello", add, hello)])
    assert run(capsys, "hello", "world") == (3, "hello world\n", "")


def test_help_has_examples_and_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for words in ("run", "check", "version", "examples:", "78 configuration error", "--log-format"):
        assert words in out
