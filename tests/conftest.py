"""Shared test set-up: structlog configured once, as the CLI does, but quiet.

Server threads outlive the test that started them by a moment and would otherwise print their
"disconnected" lines into pytest's progress output. Warnings and errors still show.
"""

import pytest

from blkdev.cli.logging_setup import configure_logging

INTEGRATION_TIMEOUT = 600
"""Seconds a real-guest test may take (the slowest takes about 40 s here under TCG)."""

configure_logging("console", "warning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-guest tests get minutes, not the default seconds, unless they set their own."""
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT))
