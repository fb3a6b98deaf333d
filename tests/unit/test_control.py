"""The control protocol without a socket: parsing (precise errors, never an exception, for any
bytes), the encoding of requests and replies, and the Controller's replies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from blkdev import control
from blkdev.control import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    INTERNAL_ERROR,
    MAX_LINE,
    UNSUPPORTED,
    Backend,
    Controller,
    QueryStats,
    QueryStatus,
    Quit,
    Request,
    RequestError,
    Resize,
    SetLogLevel,
    encode_error,
    encode_request,
    encode_return,
    parse_request,
)
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from blkdev.errors import BlkdevError
from blkdev.stats import RequestType


def line(value: object) -> bytes:
    return json.dumps(value).encode()


def error_of(raw: bytes) -> RequestError:
    result = parse_request(raw)
    assert isinstance(result, RequestError), result
    return result


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_value", "command"),
    [
        ({"execute": "query-status"}, QueryStatus()),
        ({"execute": "query-stats", "arguments": {}}, QueryStats()),
        ({"execute": "resize", "arguments": {"size": 4096}}, Resize(4096, False)),
        (
            {"execute": "resize", "arguments": {"size": 1 << 40, "force": True}},
            Resize(1 << 40, True),
        ),
        ({"execute": "set-log-level", "arguments": {"level": "debug"}}, SetLogLevel("debug")),
        ({"execute": "quit"}, Quit()),
    ],
)
def test_each_command_parses(request_value: dict[str, Any], command: control.Command) -> None:
    assert parse_request(line(request_value)) == Request(command)


def test_whitespace_and_a_trailing_cr_are_fine() -> None:
    assert parse_request(b'  {"execute" : "quit"}  \r') == Request(Quit())


@pytest.mark.parametrize(
    ("raw", "error_class", "needle"),
    [
        (b"", GENERIC_ERROR, "not JSON"),
        (b"\xff\xfe", GENERIC_ERROR, "not UTF-8"),
        (b"{execute: quit}", GENERIC_ERROR, "not JSON"),
        (b'{"execute": "resize", "arguments": {"size": NaN}}', GENERIC_ERROR, "not JSON"),
        (b"[1, 2]", GENERIC_ERROR, "JSON object"),
        (b'"quit"', GENERIC_ERROR, "JSON object"),
        (b"{}", GENERIC_ERROR, "'execute' is missing"),
        (b'{"execute": 7}', GENERIC_ERROR, "must be a string"),
        (b'{"execute": "quit", "extra": 1}', GENERIC_ERROR, "'extra' is unexpected"),
        (b'{"execute": "block_resize"}', COMMAND_NOT_FOUND, "block_resize"),
        (b'{"execute": "quit", "arguments": []}', GENERIC_ERROR, "'arguments' must be"),
        (b'{"execute": "quit", "arguments": {"now": true}}', GENERIC_ERROR, "'now' is unexpected"),
        (b'{"execute": "resize"}', GENERIC_ERROR, "'size' is missing"),
        (b'{"execute": "resize", "arguments": {"size": true}}', GENERIC_ERROR, "integer"),
        (b'{"execute": "resize", "arguments": {"size": 4096.0}}', GENERIC_ERROR, "integer"),
        (b'{"execute": "resize", "arguments": {"size": "2G"}}', GENERIC_ERROR, "integer"),
        (b'{"execute": "resize", "arguments": {"size": 0}}', GENERIC_ERROR, "between 1 and"),
        (b'{"execute": "resize", "arguments": {"size": -512}}', GENERIC_ERROR, "between 1 and"),
        (
            b'{"execute": "resize", "arguments": {"size": 9223372036854775808}}',
            GENERIC_ERROR,
            "between 1 and",
        ),
        (
            b'{"execute": "resize", "arguments": {"size": 512, "force": 1}}',
            GENERIC_ERROR,
            "'force' must be",
        ),
        (b'{"execute": "set-log-level"}', GENERIC_ERROR, "'level' is missing"),
        (
            b'{"execute": "set-log-level", "arguments": {"level": "verbose"}}',
            GENERIC_ERROR,
            "debug, info, warning, error",
        ),
        (
            b'{"execute": "set-log-level", "arguments": {"level": ["debug"]}}',
            GENERIC_ERROR,
            "must be one of",
        ),
    ],
)
def test_bad_requests_get_precise_errors(raw: bytes, error_class: str, needle: str) -> None:
    error = error_of(raw)
    assert error.error_class == error_class
    assert needle in error.desc


def test_hostile_json_is_an_error_not_an_exception() -> None:
    assert "nested too deeply" in error_of(b"[" * 30_000 + b"]" * 30_000).desc
    assert (
        "not JSON" in error_of(b'{"execute": "resize", "arguments": {"size": ' + b"9" * 5000).desc
    )
    assert "not JSON" in error_of(b'{"execute": "quit", "id": ' + b"1" * 5000 + b"}").desc
    assert "longer than" in error_of(b" " * (MAX_LINE + 1)).desc


def test_the_id_is_kept_as_json_text_and_echoed() -> None:
    request = parse_request(b'{"execute": "quit", "id": {"n": [1, "two"]}}')
    assert request == Request(Quit(), '{"n": [1, "two"]}')
    error = error_of(b'{"execute": "nope", "id": "abc"}')
    assert error.id == '"abc"'
    assert json.loads(encode_error(error.error_class, error.desc, error.id))["id"] == "abc"
    assert json.loads(encode_return({"x": 1}, '{"n": 1}')) == {"return": {"x": 1}, "id": {"n": 1}}


commands = st.one_of(
    st.just(QueryStatus()),
    st.just(QueryStats()),
    st.just(Quit()),
    st.builds(Resize, st.integers(1, control.MAX_SIZE), st.booleans()),
    st.builds(SetLogLevel, st.sampled_from(control.LOG_LEVELS)),
)


@given(commands)
def test_encoded_requests_parse_back(command: control.Command) -> None:
    raw = encode_request(command)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert parse_request(raw[:-1]) == Request(command)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=512))
def test_any_bytes_give_a_request_or_an_error(raw: bytes) -> None:
    assert isinstance(parse_request(raw), Request | RequestError)


@given(json_values)
def test_any_json_value_gives_a_request_or_an_error(value: object) -> None:
    assert isinstance(parse_request(json.dumps(value).encode()), Request | RequestError)


@given(
    st.dictionaries(
        st.sampled_from(["execute", "arguments", "id", "other"]),
        st.sampled_from(["quit", "resize", "set-log-level", "query-stats"]) | json_values,
        max_size=4,
    )
)
def test_near_miss_requests_give_a_request_or_an_error(value: dict[str, object]) -> None:
    assert isinstance(parse_request(json.dumps(value).encode()), Request | RequestError)


# -- the Controller --------------------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.stops = 0
        self.resizes: list[tuple[int, bool]] = []
        self.levels: list[str] = []
        self.resize_error: Exception | None = None

    def stop(self) -> None:
        self.stops += 1

    def resize(self, size: int, force: bool) -> None:
        self.resizes.append((size, force))
        if self.resize_error is not None:
            raise self.resize_error

    def set_level(self, level: str) -> None:
        self.levels.append(level)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[RawDisk]:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    d = RawDisk.open(str(path))
    yield d
    d.close()


def make_backend(disk: RawDisk, calls: Calls, *, can_resize: bool = True) -> Backend:
    return Backend(
        image="/images/disk.raw",
        disk=disk,
        device=BlkDevice(disk, num_queues=3),
        connected=lambda: True,
        stop=calls.stop,
        resize=calls.resize if can_resize else None,
        set_log_level=calls.set_level,
    )


def reply(controller: Controller, value: object) -> dict[str, Any]:
    response = controller.respond(line(value))
    assert response.data.endswith(b"\n") and response.data.count(b"\n") == 1
    decoded: dict[str, Any] = json.loads(response.data)
    return decoded


def test_query_status(disk: RawDisk, calls: Calls) -> None:
    status = reply(Controller(make_backend(disk, calls)), {"execute": "query-status"})["return"]
    assert status["image"] == "/images/disk.raw"
    assert (status["format"], status["size"], status["read-only"]) == ("raw", 1 << 20, False)
    assert (status["queues"], status["connected"]) == (3, True)
    assert 0 <= status["uptime"] < 60


def test_query_stats_has_every_queue_and_the_total(disk: RawDisk, calls: Calls) -> None:
    backend = make_backend(disk, calls)
    q = backend.device.stats.queues[2]
    q.end(q.begin(), RequestType.READ, 0, 4096)
    result = reply(Controller(backend), {"execute": "query-stats", "id": 1})
    assert result["id"] == 1
    stats = result["return"]
    assert [q["queue"] for q in stats["queues"]] == [0, 1, 2]
    assert stats["queues"][2]["requests"]["read"] == 1
    assert stats["total"]["bytes"] == {"read": 4096, "written": 0}
    assert stats["total"]["latency"]["count"] == 1


def test_resize_calls_the_resize_function(disk: RawDisk, calls: Calls) -> None:
    controller = Controller(make_backend(disk, calls))
    request = {"execute": "resize", "arguments": {"size": 2 << 30, "force": True}}
    assert reply(controller, request) == {"return": {}}
    assert calls.resizes == [(2 << 30, True)]


@pytest.mark.parametrize(
    "exc", [ValueError("not whole sectors"), BlkdevError("a shrink needs force"), OSError(28, "x")]
)
def test_a_refused_or_failed_resize_is_a_generic_error(
    disk: RawDisk, calls: Calls, exc: Exception
) -> None:
    calls.resize_error = exc
    error = reply(
        Controller(make_backend(disk, calls)), {"execute": "resize", "arguments": {"size": 512}}
    )
    assert error["error"]["class"] == GENERIC_ERROR
    assert str(exc) in error["error"]["desc"]


def test_resize_without_a_resize_function_is_unsupported(disk: RawDisk, calls: Calls) -> None:
    controller = Controller(make_backend(disk, calls, can_resize=False))
    error = reply(controller, {"execute": "resize", "arguments": {"size": 512}})["error"]
    assert error["class"] == UNSUPPORTED


def test_a_bug_in_a_command_is_an_internal_error(disk: RawDisk, calls: Calls) -> None:
    calls.resize_error = RuntimeError("oops")
    controller = Controller(make_backend(disk, calls))
    error = reply(controller, {"execute": "resize", "arguments": {"size": 512}})["error"]
    assert error == {"class": INTERNAL_ERROR, "desc": "internal error: oops"}
    assert "return" in reply(controller, {"execute": "query-status"})


def test_set_log_level_and_quit(disk: RawDisk, calls: Calls) -> None:
    controller = Controller(make_backend(disk, calls))
    assert reply(controller, {"execute": "set-log-level", "arguments": {"level": "error"}}) == {
        "return": {}
    }
    assert calls.levels == ["error"]
    response = controller.respond(b'{"execute": "quit"}')
    assert response.stop and json.loads(response.data) == {"return": {}}
    assert calls.stops == 0  # the server stops it once the reply is sent


@given(st.binary(max_size=256))
def test_any_bytes_get_exactly_one_reply_line(raw: bytes) -> None:
    controller = Controller(STATIC_BACKEND)
    response = controller.respond(raw)
    assert response.data.endswith(b"\n") and response.data.count(b"\n") == 1
    decoded = json.loads(response.data)
    assert set(decoded) - {"id"} in ({"return"}, {"error"})


class _NoDisk:
    """Enough of a disk for query-status in the property test (no file per example)."""

    format_name = "raw"
    network = False
    size = 512
    read_only = True
    supports_discard = False
    supports_write_zeroes = False
    discard_granularity = 512


STATIC_BACKEND = Backend(
    image="x",
    disk=_NoDisk(),  # type: ignore[arg-type]
    device=BlkDevice(_NoDisk(), num_queues=1),  # type: ignore[arg-type]
    connected=lambda: False,
    stop=lambda: None,
    set_log_level=lambda level: None,
)


# -- the log level ---------------------------------------------------------------------------


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_structlog")
def test_set_structlog_level_filters_loggers_made_after(capsys: pytest.CaptureFixture[str]) -> None:
    from blkdev.cli.logging_setup import configure_logging

    configure_logging("json", "info")
    control.set_structlog_level("error")
    logger = structlog.get_logger("after")
    logger.warning("hidden")
    logger.error("shown")
    control.set_structlog_level("debug")
    structlog.get_logger("later").debug("debug shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err and "debug shown" in err
