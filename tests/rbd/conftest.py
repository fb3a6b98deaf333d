"""A real single-node Ceph cluster (``deploy/ceph.sh``) for the RBD tests, one per session.

Images are made and inspected with the ``rbd`` tool, as an operator would; every call is
bounded (a client of a cluster that went away would otherwise wait for it).
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

# The real-guest fixtures (``harness.serve(cluster.spec(name))`` serves an RBD image).
from tests.integration.conftest import guest, harness  # noqa: F401

REPO: Final = Path(__file__).resolve().parents[2]
CEPH_SH: Final = REPO / "deploy" / "ceph.sh"
RBD_TIMEOUT: Final = 60
_names = itertools.count()


@dataclass(frozen=True)
class Cluster:
    dir: Path
    conf: str

    def rbd(self, *args: str, input: bytes | None = None) -> bytes:
        """Run ``rbd -c CONF ARGS...``; its stdout (AssertionError with stderr if it fails)."""
        done = subprocess.run(
            ["rbd", "-c", self.conf, *args],
            input=input,
            capture_output=True,
            timeout=RBD_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"rbd {' '.join(args)}: {done.stderr.decode()}"
        return done.stdout

    def create(self, size: int, *, name: str | None = None) -> str:
        """A new image in pool ``rbd``; its name."""
        name = name or f"t{next(_names)}"
        self.rbd("create", f"rbd/{name}", "--size", f"{size}B")
        return name

    def spec(self, name: str, extra: str = "") -> str:
        """What ``serve --image`` takes for image ``name``."""
        return f"rbd:rbd/{name}:conf={self.conf}{extra}"

    def export(self, name: str, path: Path) -> bytes:
        path.unlink(missing_ok=True)
        self.rbd("export", f"rbd/{name}", str(path))
        return path.read_bytes()

    def write(self, name: str, data: bytes, path: Path) -> None:
        """Replace image ``name``'s contents from the start with ``data`` (rbd import)."""
        path.write_bytes(data)
        self.rbd("rm", f"rbd/{name}")
        self.rbd("import", str(path), f"rbd/{name}")


def start_cluster(directory: Path, *extra: str) -> Cluster:
    done = subprocess.run(
        ["bash", str(CEPH_SH), "up", str(directory), *extra],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"ceph.sh up failed:\n{done.stderr.decode()}"
    conf = done.stdout.decode().strip().splitlines()[-1]
    return Cluster(directory, conf)


def stop_cluster(directory: Path) -> None:
    subprocess.run(["bash", str(CEPH_SH), "down", str(directory)], timeout=120, check=False)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("ceph")
    cluster = start_cluster(directory)
    try:
        yield cluster
    finally:
        stop_cluster(directory)
