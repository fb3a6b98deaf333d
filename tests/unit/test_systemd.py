"""blkdev.systemd: the socket-activation variables, the passed socket, and sd_notify, on real
sockets (the end-to-end run under systemd-socket-activate is tests/integration/test_systemd.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from blkdev import systemd


def test_no_variables_no_fds() -> None:
    env: dict[str, str] = {}
    assert systemd.listen_fds(env) == []


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == []
    assert env == {}


@pytest.mark.parametrize(
    "pid, count", [("abc", "1"), ("self", "x"), ("self", "-1"), ("self", "1000")]
)
def test_malformed_variables_are_an_activation_error(pid: str, count: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()) if pid == "self" else pid, "LISTEN_FDS": count}
    with pytest.raises(systemd.ActivationError):
        systemd.listen_fds(env)
    assert "LISTEN_PID" not in env and "LISTEN_FDS" not in env


def test_zero_fds_for_us() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(env) == []


def test_activated_listener_checks_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(1)
    fd = os.dup(listening.fileno())
    sock, bound = systemd.activated_listener(fd, path)
    assert bound == path and sock.fileno() == fd
    sock.close()
    fd = os.dup(listening.fileno())
    with pytest.raises(systemd.ActivationError, match="but --socket is"):
        systemd.activated_listener(fd, str(tmp_path / "other.sock"))
    os.close(fd)
    listening.close()
    quiet = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    quiet.bind(str(tmp_path / "b.sock"))
    with pytest.raises(systemd.ActivationError, match="not listening"):
        systemd.activated_listener(quiet.fileno(), None)
    quiet.close()
    r, w = os.pipe()
    with pytest.raises(systemd.ActivationError, match="not a socket"):
        systemd.activated_listener(r, None)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_the_socket(tmp_path: Path, abstract: bool) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@vub-notify-{os.getpid()}" if abstract else str(tmp_path / "notify")
    receiver.bind("\0" + name[1:] if abstract else name)
    receiver.settimeout(5)
    try:
        assert systemd.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": name})
        assert receiver.recv(100) == b"READY=1\nSTATUS=ok"
    finally:
        receiver.close()


def test_notify_without_systemd_or_with_a_dead_socket(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
