"""Log set-up: JSON lines off a terminal, key=value on one, stdlib logging through the same."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from nmbridge import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_lead_with_timestamp_level_event_and_carry_bound_context() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    logs.get_logger(pair="lan").info("port_opened", port="mem:a", slots=1024)
    (line,) = lines(out)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["level"] == "info" and line["event"] == "port_opened"
    assert (line["pair"], line["port"], line["slots"]) == ("lan", "mem:a", 1024)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", str(line["timestamp"]))


def test_auto_is_json_off_a_terminal() -> None:
    out = io.StringIO()
    logs.configure("auto", "info", out)
    logs.get_logger().info("forwarding")
    assert lines(out)[0]["event"] == "forwarding"


def test_auto_is_coloured_key_value_on_a_terminal() -> None:
    out = Terminal()
    logs.configure("auto", "info", out)
    logs.get_logger(pair="lan").info("forwarding")
    text = out.getvalue()
    assert "forwarding" in text and "pair" in text and "\x1b[" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_off_a_terminal_has_no_colour() -> None:
    out = io.StringIO()
    logs.configure("console", "info", out)
    logs.get_logger(pair="lan").info("forwarding")
    assert "pair=lan" in out.getvalue() and "\x1b[" not in out.getvalue()


def test_level_filters() -> None:
    out = io.StringIO()
    logs.configure("json", "warning", out)
    log = logs.get_logger()
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in lines(out)] == ["loud"]


def test_stdlib_logging_goes_through_the_same_renderer() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    logging.getLogger("pyroute2.ndb").warning("link %s gone", "eth1")
    logging.getLogger("pyroute2.ndb").debug("hidden")
    (line,) = lines(out)
    assert (line["event"], line["level"], line["logger"]) == ("link eth1 gone", "warning", "pyroute2.ndb")
    assert "timestamp" in line


def test_an_exception_stays_on_one_json_line() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().exception("pair_failed")
    (line,) = lines(out)
    assert "RuntimeError: boom" in str(line["exception"])


def test_configure_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", "info", first)
    logs.configure("json", "info", second)
    logs.get_logger().info("once")
    assert first.getvalue() == "" and len(lines(second)) == 1


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose")])
def test_bad_format_or_level(fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        logs.configure(fmt, level, io.StringIO())
