"""Shared test set-up: structlog configured once, as the CLI does, but quiet.

Server threads outlive the test that started them by a moment and would otherwise print their
"disconnected" lines into pytest's progress output. Warnings and errors still show.
"""

from blkdev.logging_setup import configure_logging

configure_logging("console", "warning")
