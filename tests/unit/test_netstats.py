"""blkdev.netstats against real TCP connections over loopback, asked of the kernel for real
(sock_diag through pyroute2): this process's outgoing connection is listed with its tcp_info,
another process's sockets are not, and a listener of ours and the connection it accepted are
left out by the rule (an accepted connection has a listening port of ours as its local port).
Then the same through query-stats and the metrics collector of a backend whose disk says it
reaches its storage over the network."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blkdev import netstats
from blkdev.control import Backend, Controller
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from blkdev.metrics import BackendCollector

WAIT = 30.0
"""Seconds any wait on a peer process may take (a loaded, shared machine: generous)."""
PAYLOAD = 100_000

# A peer in another process. "serve": listen on loopback (the family and address given),
# print the port, echo everything of one connection back until EOF. "connect PORT": connect
# to 127.0.0.1:PORT, print "connected", hold the connection until stdin closes.
_PEER = r"""
import socket, sys
if sys.argv[1] == "serve":
    family = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((sys.argv[3], 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
else:
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    print("connected", flush=True)
    sys.stdin.read()
"""


@dataclass
class Peer:
    proc: subprocess.Popen[str]

    def line(self) -> str:
        """The peer's next stdout line, within WAIT seconds."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        assert ready, "the peer process said nothing"
        text = self.proc.stdout.readline().strip()
        assert text, f"the peer process exited ({self.proc.poll()})"
        return text


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        assert peer.proc.stdin is not None
        peer.proc.stdin.close()
        try:
            peer.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            peer.proc.kill()
            peer.proc.wait(WAIT)


def start_peer(peers: list[Peer], *args: str) -> Peer:
    proc = subprocess.Popen(
        [sys.executable, "-c", _PEER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    peer = Peer(proc)
    peers.append(peer)
    return peer


def echo_connection(peers: list[Peer], family: str = "4", host: str = "127.0.0.1") -> socket.socket:
    """A connection of ours to an echo server in another process, after PAYLOAD bytes went
    there and came back: both sides' data are acknowledged, so tcp_info is settled."""
    server = start_peer(peers, "serve", family, host)
    port = int(server.line())
    sock = socket.create_connection((host, port), timeout=WAIT)
    sock.sendall(b"x" * PAYLOAD)
    received = 0
    while received < PAYLOAD:
        chunk = sock.recv(65536)
        assert chunk, "the echo server closed the connection"
        received += len(chunk)
    return sock


def find(connections: list[netstats.Connection], local_port: int) -> netstats.Connection:
    found = [c for c in connections if c.local_port == local_port]
    assert len(found) == 1, f"local port {local_port} not once in {connections}"
    return found[0]


def test_our_connection_is_listed_with_its_tcp_info(peers: list[Peer]) -> None:
    with echo_connection(peers) as sock:
        local_port = sock.getsockname()[1]
        server_port = sock.getpeername()[1]
        connections = netstats.own_connections()
        ours = find(connections, local_port)
        assert ours.remote == f"127.0.0.1:{server_port}"
        assert ours.rtt_us is not None and 0 < ours.rtt_us < 5_000_000, ours
        assert ours.rttvar_us is not None and ours.rttvar_us >= 0
        assert ours.retransmits is not None and ours.retransmits >= 0
        # The echo acknowledged every byte we sent (the SYN counts one in bytes_acked).
        assert ours.bytes_acked in (PAYLOAD, PAYLOAD + 1), ours
        assert ours.bytes_received == PAYLOAD, ours
        assert ours.unacked == 0 and ours.lost == 0, ours
        # The peer's side of it (its accepted socket, local port = its listening port) is in
        # the kernel's dump, but it is another process's.
        assert not [c for c in connections if c.local_port == server_port], connections
        assert ours.to_json() == {
            "remote": ours.remote,
            "local-port": local_port,
            "rtt-us": ours.rtt_us,
            "rttvar-us": ours.rttvar_us,
            "retransmits": ours.retransmits,
            "lost": 0,
            "unacked": 0,
            "bytes-acked": ours.bytes_acked,
            "bytes-received": PAYLOAD,
        }


def test_ipv6_remotes_are_bracketed_and_mapped_ipv4_reads_as_ipv4(peers: list[Peer]) -> None:
    if not socket.has_ipv6:
        raise AssertionError("this Python has no IPv6; the test needs ::1")
    with echo_connection(peers, "6", "::1") as sock:
        ours = find(netstats.own_connections(), sock.getsockname()[1])
        assert ours.remote == f"[::1]:{sock.getpeername()[1]}"
    # A dual-stack IPv6 socket reaching an IPv4 address: the kernel reports ::ffff:127.0.0.1.
    server = start_peer(peers, "serve", "4", "127.0.0.1")
    port = int(server.line())
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as mapped:
        mapped.settimeout(WAIT)
        mapped.connect(("::ffff:127.0.0.1", port))
        ours = find(netstats.own_connections(), mapped.getsockname()[1])
        assert ours.remote == f"127.0.0.1:{port}"


def test_our_listener_and_what_it_accepted_are_left_out(peers: list[Peer]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = start_peer(peers, "connect", str(port))
        listener.settimeout(WAIT)
        accepted, (_, client_port) = listener.accept()
        with accepted:
            assert client.line() == "connected"
            messages = netstats.sock_diag_dump()
            inodes = netstats.own_socket_inodes()
            connections = netstats.select_connections(messages, inodes)
            # Neither our accepted side (local port = our listening port) nor the peer's
            # client side (another process's socket, remote port = our listening port).
            assert not [c for c in connections if port in (c.local_port, c.remote_port)]
            # What leaves the accepted one out is the rule, not chance: without our listener
            # in the dump it is an established connection of ours like any other.
            not_listening = [m for m in messages if m["idiag_state"] != 10]
            without_rule = netstats.select_connections(not_listening, inodes)
            accepted_seen = find(without_rule, port)
            assert accepted_seen.remote == f"127.0.0.1:{client_port}"


# -- query-stats and the metrics --------------------------------------------------------------


class NetworkRawDisk(RawDisk):
    """A raw image that says it reaches storage over the network: what query-stats and the
    metrics do for an RBD image, without a cluster (tests/rbd has the real one)."""

    network = True  # type: ignore[misc]


def _backend(disk: RawDisk) -> Backend:
    return Backend(
        image="x",
        disk=disk,
        device=BlkDevice(disk, num_queues=1),
        connected=lambda: False,
        stop=lambda: None,
    )


def _open(cls: type[RawDisk], tmp_path: Path) -> RawDisk:
    path = tmp_path / f"{cls.__name__}.raw"
    path.write_bytes(bytes(1 << 20))
    return cls.open(str(path))


def _query_stats(backend: Backend) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(
        Controller(backend).respond(b'{"execute": "query-stats"}').data
    )
    stats: dict[str, Any] = reply["return"]
    return stats


def _scrape(backend: Backend) -> dict[str, list[Any]]:
    """The exposition text, parsed back (which also checks it is well formed)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackendCollector(backend))
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_query_stats_and_metrics_show_a_network_disks_connections(
    peers: list[Peer], tmp_path: Path
) -> None:
    disk = _open(NetworkRawDisk, tmp_path)
    try:
        backend = _backend(disk)
        with echo_connection(peers) as sock:
            remote = f"127.0.0.1:{sock.getpeername()[1]}"
            stats = _query_stats(backend)
            listed = [c for c in stats["connections"] if c["remote"] == remote]
            assert len(listed) == 1, stats["connections"]
            assert listed[0]["local-port"] == sock.getsockname()[1]
            assert 0 < listed[0]["rtt-us"] < 5_000_000
            assert listed[0]["bytes-received"] == PAYLOAD
            assert "queues" in stats and "total" in stats

            families = _scrape(backend)
            prefix = "vhost_user_blk_connection"
            by_name = {
                s.name: s.value
                for samples in families.values()
                for s in samples
                if s.labels.get("remote") == remote
            }
            assert by_name["vhost_user_blk_connections"] == 1
            assert 0 < by_name[f"{prefix}_rtt_seconds"] < 5
            assert by_name[f"{prefix}_rttvar_seconds"] >= 0
            assert by_name[f"{prefix}_retransmits_total"] >= 0
            assert by_name[f"{prefix}_lost_segments"] == 0
            assert by_name[f"{prefix}_unacked_segments"] == 0
            assert by_name[f"{prefix}_acked_bytes_total"] in (PAYLOAD, PAYLOAD + 1)
            assert by_name[f"{prefix}_received_bytes_total"] == PAYLOAD
    finally:
        disk.close()


def test_a_local_disk_has_no_connections(peers: list[Peer], tmp_path: Path) -> None:
    disk = _open(RawDisk, tmp_path)
    try:
        backend = _backend(disk)
        with echo_connection(peers):
            # Connections of the process are not the disk's when the disk has none.
            assert "connections" not in _query_stats(backend)
            families = _scrape(backend)
            assert "vhost_user_blk_connections" not in families
            assert not [f for f in families if f.startswith("vhost_user_blk_connection_")]
            assert "vhost_user_blk_disk_requests" in families
    finally:
        disk.close()
