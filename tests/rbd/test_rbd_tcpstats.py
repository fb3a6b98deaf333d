"""The TCP statistics of an RBD backend's connections to the cluster (blkdev.netstats), as
``serve --control --metrics`` shows them: after I/O from the bench driver, query-stats lists a
connection to the monitor of the conf file's ``mon host`` and one to the OSD (its address as
``ceph osd dump`` gives it), each with a plausible round-trip time, and the OSD connections
carried at least the bytes the device wrote and read. Nothing else is listed: a scrape
connection to the metrics port, open while query-stats runs, is left out. The metrics show the
same remotes, and not the scrape's own connection."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from blkdev import bench
from tests.rbd.conftest import RBD_TIMEOUT, Cluster
from tests.rbd.test_rbd_serve import Serve

MiB: Final = 1 << 20
SIZE: Final = 16 * MiB
WAIT: Final = 60.0
"""Seconds any one wait on the backend may take (a shared, loaded machine: generous)."""
RTT_LIMIT_US: Final = 10_000_000
"""A "plausible" round trip on one host: above 0, below 10 s (never a timing assertion)."""


def _mon_remotes(conf: str) -> set[str]:
    """``IP:PORT`` of every monitor address (v2 and v1) in the conf file's ``mon host``."""
    text = Path(conf).read_text()
    match = re.search(r"^mon host = (.+)$", text, re.MULTILINE)
    assert match, f"no 'mon host' in {conf}"
    remotes = {f"{ip}:{port}" for ip, port in re.findall(r"v[12]:([^,\]]+):(\d+)", match[1])}
    assert remotes, f"no address in mon host = {match[1]}"
    return remotes


def _osd_remotes(ceph: Cluster) -> set[str]:
    """``IP:PORT`` of every public address of every OSD, as the monitor's OSD map has them."""
    done = subprocess.run(
        ["ceph", "-c", ceph.conf, "osd", "dump", "--format", "json"],
        capture_output=True,
        timeout=RBD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"ceph osd dump: {done.stderr.decode()}"
    osds = json.loads(done.stdout)["osds"]
    # addr is "IP:PORT/NONCE".
    remotes = {a["addr"].split("/")[0] for osd in osds for a in osd["public_addrs"]["addrvec"]}
    assert remotes, f"no OSD address in {osds}"
    return remotes


def _metrics_port(serve: Serve) -> int:
    for line in serve.log().splitlines():
        if '"metrics listening"' in line:
            return int(json.loads(line)["address"].rsplit(":", 1)[1])
    raise AssertionError(f"serve did not say where its metrics listen:\n{serve.log()}")


def _query_stats(path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(path)
        sock.sendall(b'{"execute": "query-stats"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, "the control socket closed without a reply"
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    stats: dict[str, Any] = reply["return"]
    return stats


def test_query_stats_and_metrics_show_the_connections_to_the_cluster(
    ceph: Cluster, tmp_path: Path
) -> None:
    image = ceph.create(SIZE)
    control = str(tmp_path / "control.sock")
    serve = Serve(tmp_path, ceph.spec(image), "--control", control, "--metrics", "127.0.0.1:0")
    try:
        metrics_port = _metrics_port(serve)
        report = bench.run(
            bench.Options(
                serve.socket,
                rw="randwrite",
                iodepth=8,
                seconds=2.0,
                verify=True,
                pid=serve.proc.pid,
            )
        )
        assert report.errors == 0 and report.mismatches == 0 and report.verified > 0, report
        mons, osds = _mon_remotes(ceph.conf), _osd_remotes(ceph)

        # A scrape connection held open (idle) while query-stats runs: an accepted
        # connection of the backend's, which the rule leaves out.
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=WAIT) as scrape:
            scraper = f"127.0.0.1:{scrape.getsockname()[1]}"
            # librados holds its monitor session from the open, and the OSD's connection
            # from the first request on: both are there once the bench has run. Asked again
            # (bounded) only in case librados was reconnecting at that moment.
            deadline = time.monotonic() + WAIT
            while True:
                stats = _query_stats(control)
                connections: list[dict[str, Any]] = stats["connections"]
                remotes = {c["remote"] for c in connections}
                if (remotes & mons and remotes & osds) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert remotes & mons, f"no connection to a monitor ({mons}) in {connections}"
        assert remotes & osds, f"no connection to the OSD ({osds}) in {connections}"
        # Only the cluster's: not the scrape connection (the backend's side of it has the
        # metrics port as its local port; its remote is the scraper).
        assert remotes <= mons | osds, connections
        assert scraper not in remotes and metrics_port not in {c["local-port"] for c in connections}
        for c in connections:
            assert 0 < c["rtt-us"] < RTT_LIMIT_US and c["rttvar-us"] >= 0, c
            assert c["retransmits"] >= 0 and c["lost"] >= 0 and c["unacked"] >= 0, c
        # The OSD connections carried every byte the device wrote (sent and acknowledged:
        # the data plus librados's framing) and read (received).
        to_osd = [c for c in connections if c["remote"] in osds]
        written, read = stats["total"]["bytes"]["written"], stats["total"]["bytes"]["read"]
        assert written > 0 and read > 0, stats["total"]
        assert sum(c["bytes-acked"] for c in to_osd) >= written, (to_osd, written)
        assert sum(c["bytes-received"] for c in to_osd) >= read, (to_osd, read)
        print(
            "\nrbd connections: "
            + ", ".join(f"{c['remote']} rtt {c['rtt-us']} us" for c in connections)
        )

        # The metrics, scraped over a connection whose own side must not show up.
        http_connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=WAIT)
        try:
            http_connection.connect()
            assert http_connection.sock is not None
            scraper = f"127.0.0.1:{http_connection.sock.getsockname()[1]}"
            http_connection.request("GET", "/metrics")
            response = http_connection.getresponse()
            assert response.status == 200
            text = response.read().decode()
        finally:
            http_connection.close()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        rtt = {
            s.labels["remote"]: s.value
            for s in samples
            if s.name == "vhost_user_blk_connection_rtt_seconds"
        }
        assert set(rtt) & mons and set(rtt) & osds, rtt
        assert set(rtt) <= mons | osds and scraper not in rtt, rtt
        assert all(0 < value < RTT_LIMIT_US / 1e6 for value in rtt.values()), rtt
        acked = sum(
            s.value
            for s in samples
            if s.name == "vhost_user_blk_connection_acked_bytes_total"
            and s.labels["remote"] in osds
        )
        assert acked >= written, (acked, written)
        counts = {s.labels["remote"] for s in samples if s.name == "vhost_user_blk_connections"}
        assert counts == set(rtt)
    finally:
        serve.stop()
    assert "Traceback" not in serve.log()
