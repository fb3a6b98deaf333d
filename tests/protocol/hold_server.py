"""``python -m tests.protocol.hold_server SOCKET [PREFIX]``: a real backend process serving the
echo device, holding forever every request whose data starts with PREFIX (so that a test can
SIGKILL it with requests popped and not completed). Prints ``listening`` once it listens."""

from __future__ import annotations

import sys

from blkdev.cli.logging_setup import configure_logging
from tests.protocol.echo_device import EchoDevice
from vhost_user.server import Server


def main() -> None:
    configure_logging("json", "warning")  # on stderr: stdout is for "listening"
    device = EchoDevice(num_queues=1)
    if len(sys.argv) > 2:
        device.hold = sys.argv[2].encode()
    server = Server(sys.argv[1], device)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
