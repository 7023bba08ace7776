#!/usr/bin/env python3
"""How long this disk takes to make an append durable: the floor under every durable store.

    python3 bench/fdatasync.py [DIR]    # DIR: where the files go (default: target/, the project's disk)

For 1, 2, 4 and 8 parallel streams (threads, each appending 4 KiB to a file of its own and
calling fdatasync after each append, as a store's journal does per group commit), runs
SECONDS (3) per setting and prints syncs per second in all and the latency of one sync
(p50, p99). A gateway that makes each new key durable twice (claim, then response) before
answering cannot complete more than (streams x syncs per second per stream) / 2 keys per
second, however little CPU it uses.
"""

import os
import statistics
import sys
import tempfile
import threading
import time

SECONDS = float(os.environ.get("SECONDS_PER_SETTING", "3"))
BLOCK = b"\0" * 4096


def stream(path, stop, latencies):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while not stop.is_set():
            os.write(fd, BLOCK)
            started = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)


def run(directory, streams):
    stop = threading.Event()
    latencies = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=stream, args=(os.path.join(directory, f"s{n}"), stop, latencies[n]))
        for n in range(streams)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    every = sorted(x for per in latencies for x in per)
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    print(
        f"| {streams} | {len(every) / elapsed:,.0f} | {len(every) / elapsed / streams:,.0f} "
        f"| {statistics.median(every) * 1e3:.2f} ms | {p99 * 1e3:.2f} ms |"
    )


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target")
    os.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fdatasync.", dir=base) as directory:
        print(f"fdatasync of 4 KiB appends under {base}, {SECONDS:g} s per setting")
        print()
        print("| streams | syncs/s in all | syncs/s per stream | p50 | p99 |")
        print("|---:|---:|---:|---:|---:|")
        for streams in (1, 2, 4, 8):
            run(directory, streams)


if __name__ == "__main__":
    main()
