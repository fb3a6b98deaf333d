"""The control socket and the metrics of a real backend: the vhost-user server, a BlkDevice on
a raw image, a ControlServer and a MetricsServer, wired as ``serve`` wires them
(:func:`run_backend`). Requests driven through a vhost-user session show up in query-stats and
in the Prometheus text (parsed with prometheus-client's own parser); hostile clients (garbage,
huge lines, clients that never read or never speak, too many clients) get errors or are
dropped, and the next client is still answered; ``ctl`` runs as users run it (a subprocess).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from blkdev.control import MAX_LINE, Backend, ControlServer
from blkdev.device import BlkDevice
from blkdev.disks import open_disk
from blkdev.disks.disk import Disk
from blkdev.metrics import MetricsServer, parse_address
from tests.protocol.test_blk_protocol import IMAGE_SIZE, open_session
from vhost_user.server import Server

REPO = Path(__file__).resolve().parents[2]
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
WAIT = 10.0


def wait_until(done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Running:
    """A backend as ``serve --control PATH --metrics 127.0.0.1:0`` runs it."""

    vhost_path: str
    control_path: str
    server: Server
    backend: Backend
    thread: threading.Thread
    ready: threading.Event
    control: ControlServer | None = None
    metrics: MetricsServer | None = None
    resizes: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def metrics_url(self) -> str:
        assert self.metrics is not None
        host, port = self.metrics.address
        return f"http://{host}:{port}/metrics"


def run_backend(running: Running, control_options: dict[str, Any]) -> None:
    """The thread body: what ``serve`` does once the disk, device and server exist."""
    with (
        ControlServer(running.control_path, running.backend, **control_options) as control,
        MetricsServer("127.0.0.1", 0, running.backend) as metrics,
    ):
        running.control, running.metrics = control, metrics
        running.ready.set()
        running.server.serve_forever()


def start_backend(
    tmp_path: Path,
    *,
    resize: Callable[[int, bool], None] | None = None,
    set_log_level: Callable[[str], None] | None = None,
    **control_options: Any,
) -> tuple[Running, Disk]:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
    disk = open_disk(str(image), fmt="raw", read_only=False, cache="writeback")
    device = BlkDevice(disk, num_queues=2, serial="ctl", queue_size=128)
    vhost_path = str(tmp_path / "blk.sock")
    server = Server(vhost_path, device, message_timeout=2.0)
    extra: dict[str, Any] = {}
    if set_log_level is not None:
        extra["set_log_level"] = set_log_level
    backend = Backend(
        image=str(image),
        disk=disk,
        device=device,
        connected=lambda: server.connection is not None,
        stop=server.stop,
        resize=resize,
        **extra,
    )
    running = Running(
        vhost_path=vhost_path,
        control_path=str(tmp_path / "control.sock"),
        server=server,
        backend=backend,
        thread=threading.Thread(target=lambda: None),
        ready=threading.Event(),
    )
    running.thread = threading.Thread(
        target=run_backend, args=(running, control_options), daemon=True
    )
    running.thread.start()
    assert running.ready.wait(WAIT), "the backend did not start"
    return running, disk


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Running]:
    running, disk = start_backend(tmp_path, send_timeout=0.5, idle_timeout=1.0, max_clients=4)
    yield running
    running.server.stop()
    running.thread.join(WAIT)
    disk.close()
    assert not running.thread.is_alive()


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> dict[str, Any]:
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a reply")
            self.pending += chunk
        reply, self.pending = self.pending.split(b"\n", 1)
        decoded: dict[str, Any] = json.loads(reply)
        return decoded

    def ask(self, value: object) -> dict[str, Any]:
        self.send(json.dumps(value).encode() + b"\n")
        return self.read_reply()

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection (reading whatever it sent first)."""
        try:
            while chunk := self.sock.recv(65536):
                self.pending += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect(backend: Running) -> Iterator[Callable[[], Client]]:
    clients: list[Client] = []

    def make() -> Client:
        client = Client(backend.control_path)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def scrape(url: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(samples: list[Sample], name: str, **labels: str) -> float:
    values = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(values) == 1, (name, labels, samples)
    return values[0]


# -- the socket file ---------------------------------------------------------------------------


def test_the_socket_is_mode_0600(backend: Running) -> None:
    assert stat.S_IMODE(os.stat(backend.control_path).st_mode) == 0o600


def test_a_stale_socket_is_replaced_a_live_one_or_a_file_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: stale
    running, disk = start_backend(tmp_path)
    try:
        stale_backend = running.backend
        with ControlServer(path, stale_backend) as control:
            client = Client(path)
            assert client.ask({"execute": "query-status"})["return"]["queues"] == 2
            client.close()
            with pytest.raises(FileExistsError):
                ControlServer(path, stale_backend)
            # The refused server's liveness probe was a connection too: it must go, not stay.
            # (Its thread may take a moment to see the hang-up: wait, within bounds.)
            deadline = time.monotonic() + WAIT
            while control.client_count > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert control.client_count <= 1
        assert not os.path.exists(path)
        regular = tmp_path / "file"
        regular.write_text("keep me")
        with pytest.raises(FileExistsError):
            ControlServer(str(regular), stale_backend)
        assert regular.read_text() == "keep me"
    finally:
        running.server.stop()
        running.thread.join(WAIT)
        disk.close()


# -- commands, several clients ---------------------------------------------------------------


def test_query_status_follows_the_front_end(
    backend: Running, connect: Callable[[], Client]
) -> None:
    client = connect()
    status = client.ask({"execute": "query-status"})["return"]
    assert status["format"] == "raw" and status["size"] == IMAGE_SIZE
    assert (status["read-only"], status["queues"], status["connected"]) == (False, 2, False)
    session = open_session(backend.vhost_path)
    try:
        wait_until(
            lambda: client.ask({"execute": "query-status"})["return"]["connected"], "connected"
        )
    finally:
        session.fe.close()
        session.memory.close()
    wait_until(
        lambda: not client.ask({"execute": "query-status"})["return"]["connected"],
        "disconnected",
    )


def test_stats_and_metrics_reflect_requests_through_the_device(
    backend: Running, connect: Callable[[], Client]
) -> None:
    session = open_session(backend.vhost_path)
    try:
        assert session.request(VIRTIO_BLK_T_IN, 0, read_len=4096)[0] == 0
        assert session.request(VIRTIO_BLK_T_OUT, 8, data=bytes(1024))[0] == 0
        assert session.request(VIRTIO_BLK_T_FLUSH, 0)[0] == 0
        assert session.request(VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, read_len=512)[0] == 1
        assert session.request(0x99, 0)[0] == 2
    finally:
        session.fe.close()
        session.memory.close()
    stats = connect().ask({"execute": "query-stats"})["return"]
    q0, q1 = stats["queues"]
    assert q0["requests"] == {
        "read": 2,
        "write": 1,
        "flush": 1,
        "discard": 0,
        "write-zeroes": 0,
        "get-id": 0,
        "unsupported": 1,
        "invalid": 0,
    }
    assert q0["bytes"] == {"read": 4096, "written": 1024}
    assert q0["errors"] == {"ioerr": 1, "unsupp": 1}
    assert q0["in-flight"] == 0 and q0["latency"]["count"] == 5
    assert sum(q1["requests"].values()) == 0
    assert stats["total"]["requests"] == q0["requests"]

    families = scrape(backend.metrics_url)
    requests = families["vhost_user_blk_queue_requests"]
    assert sample(requests, "vhost_user_blk_queue_requests_total", queue="0", type="read") == 2
    assert sample(requests, "vhost_user_blk_queue_requests_total", queue="1", type="read") == 0
    disk_requests = families["vhost_user_blk_disk_requests"]
    for name, count in q0["requests"].items():
        assert sample(disk_requests, "vhost_user_blk_disk_requests_total", type=name) == count
    read = families["vhost_user_blk_queue_read_bytes"]
    assert sample(read, "vhost_user_blk_queue_read_bytes_total", queue="0") == 4096
    written = families["vhost_user_blk_disk_written_bytes"]
    assert sample(written, "vhost_user_blk_disk_written_bytes_total") == 1024
    errors = families["vhost_user_blk_disk_errors"]
    assert sample(errors, "vhost_user_blk_disk_errors_total", status="ioerr") == 1
    assert sample(errors, "vhost_user_blk_disk_errors_total", status="unsupp") == 1
    in_flight = families["vhost_user_blk_queue_requests_in_flight"]
    assert sample(in_flight, "vhost_user_blk_queue_requests_in_flight", queue="0") == 0
    histogram = families["vhost_user_blk_queue_request_duration_seconds"]
    name = "vhost_user_blk_queue_request_duration_seconds"
    buckets = [s for s in histogram if s.name == f"{name}_bucket" and s.labels["queue"] == "0"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
    assert counts[-1] == sample(histogram, f"{name}_count", queue="0") == 5
    assert sample(histogram, f"{name}_sum", queue="0") > 0
    assert sample(families["vhost_user_blk_disk_size_bytes"], "vhost_user_blk_disk_size_bytes") == (
        IMAGE_SIZE
    )
    assert sample(families["vhost_user_blk_queues"], "vhost_user_blk_queues") == 2
    info = families["vhost_user_blk_info"]
    assert sample(info, "vhost_user_blk_info", image=backend.backend.image, format="raw") == 1
    connected = families["vhost_user_blk_frontend_connected"]
    assert sample(connected, "vhost_user_blk_frontend_connected") in (0, 1)


def test_several_clients_at_once(backend: Running) -> None:
    failures: list[str] = []

    def worker(n: int) -> None:
        try:
            client = Client(backend.control_path)
            for i in range(20):
                reply = client.ask({"execute": "query-stats", "id": [n, i]})
                if reply.get("id") != [n, i] or "return" not in reply:
                    failures.append(repr(reply))
            client.close()
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not failures


def test_pipelined_requests_are_answered_in_order(connect: Callable[[], Client]) -> None:
    client = connect()
    client.send(
        b"".join(
            json.dumps({"execute": "query-status", "id": i}).encode() + b"\n" for i in range(50)
        )
    )
    assert [client.read_reply()["id"] for _ in range(50)] == list(range(50))


# -- hostile clients ---------------------------------------------------------------------------


def test_garbage_unknown_commands_and_bad_arguments_get_errors(
    connect: Callable[[], Client],
) -> None:
    client = connect()
    for raw, error_class in [
        (b"\x00\xff garbage \x80", "GenericError"),
        (b"not json at all", "GenericError"),
        (b"[[[[[[[[[[[[[[[[", "GenericError"),
        (b'{"execute": "format-disk"}', "CommandNotFound"),
        (b'{"execute": "resize", "arguments": {"size": "huge"}}', "GenericError"),
        (b'{"execute": "resize", "arguments": {"size": 4096, "shrink": true}}', "GenericError"),
        (b'{"execute": "set-log-level", "arguments": {"level": 3}}', "GenericError"),
        (b'{"execute": "resize", "arguments": {"size": 4096}}', "Unsupported"),
    ]:
        client.send(raw + b"\n")
        assert client.read_reply()["error"]["class"] == error_class, raw
    assert "return" in client.ask({"execute": "query-status"})


def test_a_huge_line_is_refused_and_the_client_dropped(
    backend: Running, connect: Callable[[], Client]
) -> None:
    hostile = connect()
    try:
        hostile.send(b"x" * (MAX_LINE + 10))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert hostile.closed_by_server()
    first_reply = json.loads(hostile.pending.split(b"\n")[0])
    assert "longer than" in first_reply["error"]["desc"]
    assert "return" in connect().ask({"execute": "query-status"})


def test_a_complete_line_over_the_limit_is_refused_too(connect: Callable[[], Client]) -> None:
    hostile = connect()
    try:
        hostile.send(b" " * (MAX_LINE + 1) + b'{"execute": "quit"}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert hostile.closed_by_server()
    assert "longer than" in json.loads(hostile.pending.split(b"\n")[0])["error"]["desc"]
    assert "return" in connect().ask({"execute": "query-status"})


def test_a_client_that_never_reads_is_dropped(
    backend: Running, connect: Callable[[], Client]
) -> None:
    hostile = connect()
    hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b'{"execute": "query-stats"}\n' * 256
    sent_until_dropped = threading.Event()

    def flood() -> None:
        try:
            for _ in range(10_000):
                hostile.sock.sendall(request)
        except OSError:
            sent_until_dropped.set()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    wait_until(lambda: backend.control is not None and backend.control.client_count == 1, "flood")
    assert sent_until_dropped.wait(WAIT), "the server never dropped a client that does not read"
    flooder.join(WAIT)
    assert "return" in connect().ask({"execute": "query-status"})


def test_a_silent_client_is_dropped_after_the_idle_timeout(connect: Callable[[], Client]) -> None:
    silent = connect()
    started = time.monotonic()
    assert silent.closed_by_server()
    assert 0.5 < time.monotonic() - started < WAIT
    assert "return" in connect().ask({"execute": "query-status"})


def test_a_client_leaving_mid_line_changes_nothing(connect: Callable[[], Client]) -> None:
    leaver = connect()
    leaver.send(b'{"execute": "qu')
    leaver.close()
    assert "return" in connect().ask({"execute": "query-status"})


def test_too_many_clients_are_told_and_closed(backend: Running) -> None:
    clients = [Client(backend.control_path) for _ in range(4)]
    try:
        for c in clients:
            assert "return" in c.ask({"execute": "query-status"})
        extra = Client(backend.control_path)
        assert "too many" in extra.read_reply()["error"]["desc"]
        assert extra.closed_by_server()
        extra.close()
        clients.pop().close()
        wait_until(lambda: backend.control is not None and backend.control.client_count < 4, "exit")
        late = Client(backend.control_path)
        assert "return" in late.ask({"execute": "query-status"})
        late.close()
    finally:
        for c in clients:
            c.close()


# -- quit, resize, log level -----------------------------------------------------------------


def test_quit_stops_the_server_like_sigterm(
    backend: Running, connect: Callable[[], Client]
) -> None:
    assert connect().ask({"execute": "quit", "id": "bye"}) == {"return": {}, "id": "bye"}
    backend.thread.join(WAIT)
    assert not backend.thread.is_alive()
    assert not os.path.exists(backend.control_path)
    assert not os.path.exists(backend.vhost_path)


def test_resize_reaches_the_resize_function(tmp_path: Path) -> None:
    asked: list[tuple[int, bool]] = []

    def resize(size: int, force: bool) -> None:
        if size < IMAGE_SIZE and not force:
            raise ValueError("shrinking needs force")
        asked.append((size, force))

    running, disk = start_backend(tmp_path, resize=resize)
    try:
        client = Client(running.control_path)
        grow = {"execute": "resize", "arguments": {"size": 2 * IMAGE_SIZE}}
        assert client.ask(grow) == {"return": {}}
        shrink = {"execute": "resize", "arguments": {"size": 512}}
        assert "shrinking needs force" in client.ask(shrink)["error"]["desc"]
        assert asked == [(2 * IMAGE_SIZE, False)]
        client.close()
    finally:
        running.server.stop()
        running.thread.join(WAIT)
        disk.close()


# -- ctl, as users run it ----------------------------------------------------------------------


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blkdev.cli", "ctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ctl_commands_and_exit_codes(tmp_path: Path) -> None:
    asked: list[tuple[int, bool]] = []
    levels: list[str] = []

    def resize(size: int, force: bool) -> None:
        if size < IMAGE_SIZE and not force:
            raise ValueError("shrinking needs force")
        asked.append((size, force))

    running, disk = start_backend(tmp_path, resize=resize, set_log_level=levels.append)
    path = running.control_path
    try:
        status = ctl(path, "query-status")
        assert status.returncode == 0, status
        assert json.loads(status.stdout)["size"] == IMAGE_SIZE
        stats = ctl(path, "query-stats")
        assert stats.returncode == 0 and "total" in json.loads(stats.stdout)
        grown = ctl(path, "resize", "2G")
        assert (grown.returncode, grown.stdout) == (0, ""), grown
        assert ctl(path, "resize", "1M", "--force").returncode == 0
        assert asked == [(2 << 30, False), (1 << 20, True)]
        refused = ctl(path, "resize", "1K")
        assert refused.returncode == 1
        assert "GenericError" in refused.stderr and "shrinking needs force" in refused.stderr
        assert ctl(path, "set-log-level", "debug").returncode == 0
        assert levels == ["debug"]
        for usage in (("resize", "lots"), ("set-log-level", "loud"), ("frobnicate",)):
            bad = ctl(path, *usage)
            assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad
        bye = ctl(path, "quit")
        assert bye.returncode == 0, bye
        running.thread.join(WAIT)
        assert not running.thread.is_alive()
        gone = ctl(path, "query-status")
        assert gone.returncode == 2 and "Traceback" not in gone.stderr
        lines = gone.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot connect" in lines[0], gone.stderr
    finally:
        running.server.stop()
        running.thread.join(WAIT)
        disk.close()


# -- metrics addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_metrics_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "host", "host:", "host:port", "1.2.3.4:70000", "::1:9100"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
