"""Integration fixtures: one guest build per session, one harness per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.guest import Guest, ensure_built
from deploy.vm import short_tmpdir
from tests.integration.helpers import Harness


@pytest.fixture(scope="session")
def guest() -> Guest:
    return ensure_built()


@pytest.fixture
def harness(guest: Guest, tmp_path: Path) -> Iterator[Harness]:
    with short_tmpdir() as sockdir:
        h = Harness(guest, tmp_path, sockdir)
        try:
            yield h
        finally:
            h.close()
