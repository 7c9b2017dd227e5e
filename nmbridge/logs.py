"""Structured logs: one set-up for structlog and for the stdlib ``logging`` of libraries.

JSON lines on stdout when stdout is not a terminal (or ``format="json"``), coloured
``key=value`` lines on a terminal.  Every line has an ISO-8601 UTC ``timestamp``, a ``level``
and an ``event`` name; loggers bind context such as ``pair=`` and ``port=``.  Records from
stdlib loggers (pyroute2 and others) go through the same renderer, with ``logger=`` naming
their source.  Nothing in nmbridge logs per packet.
"""

from __future__ import annotations

import logging
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
    handler = logging.StreamHandler(out)
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
