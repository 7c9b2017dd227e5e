"""Structured logs: one set-up for structlog and for the stdlib ``logging`` of libraries.

JSON lines on stdout when stdout is not a terminal (or ``format="json"``), coloured
``key=value`` lines on a terminal.  Every line has an ISO-8601 UTC ``timestamp``, a ``level``
and an ``event`` name; loggers bind context such as ``pair=`` and ``port=``.  Records from
stdlib loggers (pyroute2 and others) go through the same renderer, with ``logger=`` naming
their source.  Nothing in nmbridge logs per packet.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")
_HANDLER_NAME = "nmbridge"
_FIRST = ("timestamp", "level", "event")


def _first_keys(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """timestamp, level and event lead every JSON line, in that order."""
    return {**{k: event.pop(k) for k in _FIRST if k in event}, **event}


def is_closed_pipe(e: BaseException | None) -> bool:
    """Whether `e` says the reader of our output went away (EPIPE)."""
    return isinstance(e, OSError) and e.errno == errno.EPIPE


def discard_output(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null, so that what is still buffered, and
    whatever is written later (the interpreter's last flush included), goes nowhere quietly
    instead of failing again on a closed pipe."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


class _Handler(logging.StreamHandler[TextIO]):
    """The log handler; it survives its reader going away (``run | head -1``, a log
    collector restarted): the first write to a closed pipe prints one line on stderr, and
    later records are dropped, where a plain StreamHandler prints a traceback per record.
    Logs are not worth an outage: the bridge keeps forwarding."""

    lost = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.lost:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not is_closed_pipe(sys.exc_info()[1]):
            super().handleError(record)
            return
        self.lost = True
        discard_output(self.stream)
        try:
            print("nmbridge: the log output was closed (its reader went away): logs are discarded from "
                  "now on; the bridge keeps forwarding (nmbridge stats shows its counters)",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError, AttributeError):
            pass


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up logging for the process; may be called again (the last call wins).

    `fmt` is ``auto`` (JSON unless `stream` is a terminal), ``json`` or ``console``; `level`
    one of ``debug``, ``info``, ``warning``, ``error``; `stream` defaults to stdout.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stdout
    if out is None:  # started with stdout closed (`>&-`): nowhere to log
        out = open(os.devnull, "w")  # lives as long as the process
    tty = out.isatty()
    as_json = fmt == "json" or (fmt == "auto" and not tty)

    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Processor] = [structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level, stamp]
    render: list[Processor] = (
        [structlog.processors.format_exc_info, _first_keys, structlog.processors.JSONRenderer()]
        if as_json else [structlog.dev.ConsoleRenderer(colors=tty)]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = _Handler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> structlog.stdlib.BoundLogger:
    """nmbridge's logger with `context` bound (``pair=``, ``port=``...)."""
    log: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger("nmbridge").bind(**context)
    return log
