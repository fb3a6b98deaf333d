"""structlog configuration, done once by the CLI's ``main``; library code only calls
``structlog.get_logger`` and binds context (connection, queue)."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(
    log_format: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Render JSON lines when not on a terminal (or when asked), readable lines otherwise.

    Logs go to stderr so that stdout stays free for command output (``image info`` JSON).
    structlog's ``PrintLogger`` writes each event with one ``write`` call, so lines from the
    per-queue worker threads never interleave.
    """
    out = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
