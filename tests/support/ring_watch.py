"""A second agent that watches one split ring's indices from another process, for tests.

``python -m tests.support.ring_watch FD SIZE AVAIL_OFF USED_OFF EVENT_IDX MAX_SECONDS`` maps the
guest-memory file ``FD`` (inherited), then loads the ring's free-running u16 indices in a tight
loop, as a driver or device on another CPU would, until its standard input reaches EOF (the
test is done) or ``MAX_SECONDS`` pass. ``AVAIL_OFF`` and ``USED_OFF`` are the file offsets of
the available and used rings. It prints one JSON object: how many samples it took and how many
broke an invariant that holds at every instant if, and only if, every store of these fields is
one store (memory.shared):

- ``used_back`` / ``avail_back`` / ``avail_event_back`` / ``used_event_back``: the field moved
  backwards (a torn store reads as a value below the last one: CPython's ``pack_into`` zeroes
  the field before it stores it).
- ``used_ahead``: used->idx ahead of avail->idx, i.e. more entries used than were ever made
  available; ``avail_event_ahead``: avail_event ahead of avail->idx (the device asked to be
  kicked for an entry it has "already popped"). Both are loaded before avail->idx, which only
  grows, so on x86 (loads are not reordered with loads) the later avail->idx is at least the
  value current when they were loaded.

Each index loaded is one aligned 2-byte load (``memoryview.cast("H")``), so the watcher cannot
tear what it reads.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import sys
import time


def _behind(new: int, old: int) -> bool:
    """``new`` is before ``old`` in u16 free-running order (at most half the space back)."""
    return 0 < ((old - new) & 0xFFFF) < 0x8000


def watch(
    fd: int, size: int, avail_off: int, used_off: int, event_idx: bool, max_seconds: float
) -> dict[str, int]:
    mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    words = memoryview(mm).cast("H")
    avail_idx = avail_off // 2 + 1
    used_event = avail_off // 2 + 2 + size
    used_idx = used_off // 2 + 1
    avail_event = used_off // 2 + 2 + 4 * size
    stats = dict.fromkeys(
        (
            "samples",
            "used_back",
            "used_ahead",
            "avail_back",
            "avail_event_back",
            "avail_event_ahead",
            "used_event_back",
            "used_moves",
        ),
        0,
    )
    last_u = words[used_idx]
    last_a = words[avail_idx]
    last_ae = words[avail_event]
    last_ue = words[used_event]
    deadline = time.monotonic() + max_seconds
    stdin = sys.stdin.fileno()
    samples = 0
    while True:
        for _ in range(20000):
            u = words[used_idx]
            if event_idx:
                ae = words[avail_event]
                ue = words[used_event]
            a = words[avail_idx]
            if u != last_u:
                stats["used_moves"] += 1
                if _behind(u, last_u):
                    stats["used_back"] += 1
                last_u = u
            if _behind(a, u):
                stats["used_ahead"] += 1
            if a != last_a:
                if _behind(a, last_a):
                    stats["avail_back"] += 1
                last_a = a
            if event_idx:
                if ae != last_ae:
                    if _behind(ae, last_ae):
                        stats["avail_event_back"] += 1
                    last_ae = ae
                if _behind(a, ae):
                    stats["avail_event_ahead"] += 1
                if ue != last_ue:
                    if _behind(ue, last_ue):
                        stats["used_event_back"] += 1
                    last_ue = ue
        samples += 20000
        if select.select([stdin], [], [], 0)[0] or time.monotonic() > deadline:
            break
    stats["samples"] = samples
    words.release()
    mm.close()
    return stats


def main(argv: list[str]) -> int:
    fd, size, avail_off, used_off = (int(v) for v in argv[:4])
    event_idx = argv[4] == "1"
    max_seconds = float(argv[5])
    os.set_blocking(sys.stdin.fileno(), False)
    print(json.dumps(watch(fd, size, avail_off, used_off, event_idx, max_seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
