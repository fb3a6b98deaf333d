"""Prometheus metrics of a running backend, in the text exposition format, over HTTP.

A custom collector reads what the control socket reads (:meth:`blkdev.stats.DeviceStats.
snapshot` and :meth:`blkdev.control.Backend.status`) at each scrape: there is no second
bookkeeping, and nothing on the request path knows about Prometheus.

Per queue (label ``queue``), and per disk (the sum over its queues, no ``queue`` label, so
that summing a per-queue family never counts a request twice):

- ``vhost_user_blk_{queue,disk}_requests_total{type}``: requests by type (read, write, flush,
  discard, write-zeroes, get-id, unsupported, invalid; see :mod:`blkdev.stats`);
- ``..._read_bytes_total``, ``..._written_bytes_total``: data of successful reads and writes;
- ``..._errors_total{status}``: requests answered IOERR (``ioerr``) or UNSUPP (``unsupp``);
- ``..._requests_in_flight``;
- ``..._request_duration_seconds``: the latency histogram (its fixed, log-spaced buckets).

Per disk besides: ``vhost_user_blk_disk_size_bytes``, ``vhost_user_blk_disk_read_only``,
``vhost_user_blk_queues``, ``vhost_user_blk_frontend_connected``,
``vhost_user_blk_uptime_seconds``, and ``vhost_user_blk_info{image,format}`` (always 1), the
one family naming the image: one backend serves one disk.

For a disk reached over the network (an RBD image: librados's connections to the monitors and
OSDs, :mod:`blkdev.netstats`), per remote ``IP:PORT`` (label ``remote``):
``vhost_user_blk_connections`` (established connections to it), ``..._connection_rtt_seconds``
and ``..._connection_rttvar_seconds`` (smoothed round-trip time and its mean deviation),
``..._connection_retransmits_total`` (segments retransmitted), ``..._connection_lost_segments``
and ``..._connection_unacked_segments`` (now), ``..._connection_acked_bytes_total`` and
``..._connection_received_bytes_total``. One sample per remote keeps the series stable: when
there are two connections to one remote (librados reconnecting), the counters and segment
counts are their sums and the round-trip times the slower one's. A counter restarts from 0 when
librados reconnects, which Prometheus's ``rate`` takes as a counter reset.

Entry point for ``serve`` (``--metrics HOST:PORT``; a bare ``PORT`` or ``:PORT`` listens on
loopback)::

    host, port = parse_address(text)             # ValueError names the mistake
    with MetricsServer(host, port, backend):      # listens now (OSError if it cannot)
        server.serve_forever()
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from blkdev.control import Backend
from blkdev.netstats import Connection
from blkdev.stats import LATENCY_BOUNDS_NS, REQUEST_TYPE_NAMES, QueueSnapshot

PREFIX: Final = "vhost_user_blk"
DEFAULT_HOST: Final = "127.0.0.1"

_LE: Final = (*(f"{bound / 1e9:g}" for bound in LATENCY_BOUNDS_NS), "+Inf")
_ADDRESS: Final = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); loopback when
    no host is given. Port 0 picks a free port (tests). ValueError names the mistake."""
    if text.isdigit():
        text = f":{text}"
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not HOST:PORT (examples: 9100, 127.0.0.1:9100, [::1]:9100)")
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")
    host = match["v6"] if match["v6"] is not None else match["host"]
    return host or DEFAULT_HOST, port


class BackendCollector(Collector):
    """Reads ``backend``'s statistics and status at each collection."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        snapshot = self.backend.device.stats.snapshot()
        status = self.backend.status()
        per_queue = [([str(i)], q) for i, q in enumerate(snapshot.queues)]
        yield from _request_families("queue", ["queue"], per_queue)
        yield from _request_families("disk", [], [([], snapshot.total)])

        info = InfoMetricFamily(PREFIX, "The image served")
        info.add_metric([], {"image": str(status["image"]), "format": str(status["format"])})
        yield info
        for name, doc, value in (
            ("disk_size_bytes", "Virtual size of the disk", status["size"]),
            ("disk_read_only", "1 if the disk is exported read-only", status["read-only"]),
            ("queues", "Virtqueues the device offers", status["queues"]),
            (
                "frontend_connected",
                "1 while a vhost-user front-end is connected",
                status["connected"],
            ),
            ("uptime_seconds", "Seconds since the backend started", status["uptime"]),
        ):
            assert isinstance(value, int | float)
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))
        if self.backend.disk.network:
            connections = self.backend.connections()
            if connections is not None:  # None: the kernel could not be asked (logged)
                yield from _connection_families(connections)


def _request_families(
    scope: str, labels: list[str], rows: list[tuple[list[str], QueueSnapshot]]
) -> Iterator[Metric]:
    """The request-statistics families of ``scope`` (queue or disk), one sample set per row."""
    name = f"{PREFIX}_{scope}"
    requests = CounterMetricFamily(
        f"{name}_requests", f"Requests by type, per {scope}", labels=[*labels, "type"]
    )
    read = CounterMetricFamily(
        f"{name}_read_bytes", f"Bytes read by successful requests, per {scope}", labels=labels
    )
    written = CounterMetricFamily(
        f"{name}_written_bytes", f"Bytes written by successful requests, per {scope}", labels=labels
    )
    errors = CounterMetricFamily(
        f"{name}_errors",
        f"Requests answered with an error status, per {scope}",
        labels=[*labels, "status"],
    )
    in_flight = GaugeMetricFamily(
        f"{name}_requests_in_flight", f"Requests being served, per {scope}", labels=labels
    )
    duration = HistogramMetricFamily(
        f"{name}_request_duration_seconds",
        f"Time the device took to serve a request, per {scope}",
        labels=labels,
    )
    for values, q in rows:
        for type_name, count in zip(REQUEST_TYPE_NAMES, q.requests, strict=True):
            requests.add_metric([*values, type_name], count)
        read.add_metric(values, q.bytes_read)
        written.add_metric(values, q.bytes_written)
        errors.add_metric([*values, "ioerr"], q.io_errors)
        errors.add_metric([*values, "unsupp"], q.unsupported_errors)
        in_flight.add_metric(values, q.in_flight)
        cumulative, buckets = 0, []
        for le, count in zip(_LE, q.latency_buckets, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        duration.add_metric(values, buckets, sum_value=q.latency_sum_ns / 1e9)
    yield from (requests, read, written, errors, in_flight, duration)


def _connection_families(connections: list[Connection]) -> Iterator[Metric]:
    """The TCP families of a network disk, one sample per remote (see the module docstring)."""
    by_remote: dict[str, list[Connection]] = {}
    for connection in connections:
        by_remote.setdefault(connection.remote, []).append(connection)
    label = ["remote"]
    count = GaugeMetricFamily(
        f"{PREFIX}_connections", "Established TCP connections to the disk's storage", labels=label
    )
    rtt = GaugeMetricFamily(
        f"{PREFIX}_connection_rtt_seconds", "Smoothed TCP round-trip time", labels=label
    )
    rttvar = GaugeMetricFamily(
        f"{PREFIX}_connection_rttvar_seconds",
        "Mean deviation of the TCP round-trip time",
        labels=label,
    )
    retransmits = CounterMetricFamily(
        f"{PREFIX}_connection_retransmits", "TCP segments retransmitted", labels=label
    )
    lost = GaugeMetricFamily(
        f"{PREFIX}_connection_lost_segments", "TCP segments now thought lost", labels=label
    )
    unacked = GaugeMetricFamily(
        f"{PREFIX}_connection_unacked_segments",
        "TCP segments sent and not acknowledged yet",
        labels=label,
    )
    acked = CounterMetricFamily(
        f"{PREFIX}_connection_acked_bytes", "Bytes sent and acknowledged by the peer", labels=label
    )
    received = CounterMetricFamily(
        f"{PREFIX}_connection_received_bytes", "Bytes received from the peer", labels=label
    )
    for remote, group in sorted(by_remote.items()):
        values = [remote]
        count.add_metric(values, len(group))
        # The slower connection's round trip (a missing one, from an old kernel, counts as
        # none): the one a request waits on when it is unlucky.
        slowest = max(group, key=lambda c: c.rtt_us if c.rtt_us is not None else -1)
        if slowest.rtt_us is not None:
            rtt.add_metric(values, slowest.rtt_us / 1e6)
        if slowest.rttvar_us is not None:
            rttvar.add_metric(values, slowest.rttvar_us / 1e6)
        for family, numbers in (
            (retransmits, [c.retransmits for c in group]),
            (lost, [c.lost for c in group]),
            (unacked, [c.unacked for c in group]),
            (acked, [c.bytes_acked for c in group]),
            (received, [c.bytes_received for c in group]),
        ):
            # A field the kernel's tcp_info lacks is left out, never reported as 0.
            known = [n for n in numbers if n is not None]
            if known:
                family.add_metric(values, sum(known))
    yield from (count, rtt, rttvar, retransmits, lost, unacked, acked, received)


class MetricsServer:
    """An HTTP server for ``backend``'s metrics on ``host:port``, listening from construction
    until :meth:`close`, on a daemon thread of its own (prometheus-client's WSGI server, one
    thread per scrape)."""

    def __init__(self, host: str, port: int, backend: Backend) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BackendCollector(backend))
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, host, registry=registry)
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port chosen when 0 was asked)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
