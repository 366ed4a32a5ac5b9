"""structlog set-up, done once per process.

Logs go to stderr so that `--json` output on stdout stays clean: a human
renderer on a TTY, one JSON object per line otherwise (the daemon's log file,
CI, journald).  Children spawned by the supervisor call `configure` again.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", *, stream: TextIO | None = None,
              json: bool | None = None) -> None:
    """Configure structlog for this process; `json=None` picks by whether `stream` is a TTY."""
    out = stream if stream is not None else sys.stderr
    as_json = (not out.isatty()) if json is None else json
    renderer: Any = (structlog.processors.JSONRenderer() if as_json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A lazy logger carrying `logger_name=name`.

    Lazy matters: modules take their logger at import time, before `configure`
    runs, and `.bind()` on structlog's lazy proxy would freeze the default
    configuration into it.  (`logger=` cannot be an initial value: it is a
    parameter of structlog's `wrap_logger`.)"""
    return structlog.get_logger(logger_name=name)
