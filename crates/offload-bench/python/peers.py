#!/usr/bin/env python3
"""The Python peers of offload's ProcessPool, measured by offload-bench in the same run.

Standard library only (no pip package). Two ways to run it:

    python3 peers.py [--quick] [--rows submit,map,roundtrip,startup,payload]

measures on its own and prints {"rows": [...]} (one JSON document, rows shaped like
offload-bench's: id, unit, median, min, max, better, samples) on stdout. And

    python3 peers.py --serve

is how offload-bench drives it: one JSON request per line on stdin, one JSON reply per line
on stdout, so that the harness can interleave Python's samples with offload's (a change in the
machine's load then hits both alike). Requests:

    {"cmd": "info"}                         -> {"python": "3.11.7", "start_method": "fork"}
    {"cmd": "submit", "n": 20000}           -> {"value": tasks_per_s}
    {"cmd": "map", "n": 1000000}            -> {"value": tasks_per_s}
    {"cmd": "roundtrip", "n": 100}          -> {"latencies_us": [...]}
    {"cmd": "startup", "method": null}      -> {"value": ms, "method": "fork"}
    {"cmd": "payload", "bytes": 8388608}    -> {"value": mb_per_s}

A failed request answers {"error": "..."}. The pools are created on first use and kept (warm)
until stdin closes.

What is measured (the Rust side measures offload the same way):

- submit: ProcessPoolExecutor(2); submit n tiny tasks one by one, then .result() each;
  tasks / wall time.
- map: multiprocessing.Pool(2).map(noop, range(n)), default chunksize (n / (4 * 2) here).
- roundtrip: n sequential ex.submit(noop, i).result(), each one timed.
- startup: ProcessPoolExecutor(2, mp_context) created, one task submitted and its result
  received; the pool's shutdown is not timed. method null = the platform default.
- payload: one bytes argument of `bytes` bytes sent to an echo task and received back;
  MB/s = argument bytes / round-trip time / 10**6.
"""

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

WORKERS = 2


def noop(x):
    """The tiniest task: all its cost is the pool's."""
    return x


def echo(data):
    """Returns its argument: a payload there and back."""
    return data


class Peers:
    """The Python systems, created on first use and kept warm."""

    def __init__(self):
        self._ppe = None
        self._pool = None

    def ppe(self):
        if self._ppe is None:
            self._ppe = ProcessPoolExecutor(WORKERS)
            # Start the workers (fork starts all at the first submit).
            for f in [self._ppe.submit(noop, i) for i in range(4 * WORKERS)]:
                f.result()
        return self._ppe

    def pool(self):
        if self._pool is None:
            self._pool = multiprocessing.Pool(WORKERS)
        return self._pool

    def close(self):
        if self._ppe is not None:
            self._ppe.shutdown(wait=True)
        if self._pool is not None:
            self._pool.close()
            self._pool.join()

    def submit(self, n):
        ex = self.ppe()
        start = time.perf_counter()
        futures = [ex.submit(noop, i) for i in range(n)]
        total = 0
        for f in futures:
            total += f.result()
        elapsed = time.perf_counter() - start
        if total != n * (n - 1) // 2:
            raise RuntimeError("submit lost results")
        return n / elapsed

    def map(self, n):
        pool = self.pool()
        start = time.perf_counter()
        total = sum(pool.map(noop, range(n)))
        elapsed = time.perf_counter() - start
        if total != n * (n - 1) // 2:
            raise RuntimeError("map lost results")
        return n / elapsed

    def roundtrip(self, n):
        ex = self.ppe()
        latencies = []
        for i in range(n):
            start = time.perf_counter()
            y = ex.submit(noop, i).result()
            latencies.append((time.perf_counter() - start) * 1e6)
            if y != i:
                raise RuntimeError(f"round trip returned {y} for {i}")
        return latencies

    @staticmethod
    def startup(method):
        ctx = multiprocessing.get_context(method)
        start = time.perf_counter()
        ex = ProcessPoolExecutor(WORKERS, mp_context=ctx)
        y = ex.submit(noop, 1).result()
        elapsed = time.perf_counter() - start
        ex.shutdown(wait=True)
        if y != 1:
            raise RuntimeError("startup task returned a wrong result")
        return elapsed * 1e3, ctx.get_start_method()

    def payload(self, nbytes):
        ex = self.ppe()
        data = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
        start = time.perf_counter()
        out = ex.submit(echo, data).result()
        elapsed = time.perf_counter() - start
        if out != data:
            raise RuntimeError("the payload came back changed")
        return nbytes / elapsed / 1e6


def recycle(n, every):
    """`n` tiny tasks on 2 workers replaced every `every` tasks; tasks per second.

    `max_tasks_per_child` is refused with the "fork" start method, so this uses "forkserver".
    On Python 3.11 it can hang (CPython issue 115634): the harness runs it under a timeout.
    """
    ctx = multiprocessing.get_context("forkserver")
    start = time.perf_counter()
    with ProcessPoolExecutor(WORKERS, mp_context=ctx, max_tasks_per_child=every) as ex:
        futures = [ex.submit(noop, i) for i in range(n)]
        total = sum(f.result() for f in futures)
    elapsed = time.perf_counter() - start
    if total != n * (n - 1) // 2:
        raise RuntimeError("recycle lost results")
    return n / elapsed


def info():
    return {
        "python": platform.python_version(),
        "start_method": multiprocessing.get_start_method(),
    }


def handle(peers, request):
    cmd = request.get("cmd")
    if cmd == "info":
        return info()
    if cmd == "submit":
        return {"value": peers.submit(int(request["n"]))}
    if cmd == "map":
        return {"value": peers.map(int(request["n"]))}
    if cmd == "roundtrip":
        return {"latencies_us": peers.roundtrip(int(request["n"]))}
    if cmd == "startup":
        ms, method = peers.startup(request.get("method"))
        return {"value": ms, "method": method}
    if cmd == "payload":
        return {"value": peers.payload(int(request["bytes"]))}
    raise ValueError(f"unknown command {cmd!r}")


def serve():
    peers = Peers()
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                reply = handle(peers, json.loads(line))
            except Exception as e:  # the harness reports it and fails the benchmark
                reply = {"error": f"{type(e).__name__}: {e}"}
            # Flushed before the next request, so that no forked child holds a copy of
            # unwritten output.
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        peers.close()


def percentile(xs, p):
    """Nearest rank, like offload-bench's stats::percentile."""
    s = sorted(xs)
    rank = max(1, min(len(s), math.ceil(p * len(s))))
    return s[rank - 1]


def row(id_, unit, better, samples, note=None):
    r = {
        "id": id_,
        "unit": unit,
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "better": better,
        "samples": samples,
    }
    if note:
        r["note"] = note
    return r


def standalone(quick, wanted):
    peers = Peers()
    runs = 3 if quick else 5
    rows = []
    method = multiprocessing.get_start_method()
    try:
        if "submit" in wanted:
            peers.submit(2_000)
            s = [peers.submit(20_000) for _ in range(runs)]
            rows.append(row("process.submit_tasks_per_s.python_ppe", "tasks/s", "higher", s))
        if "map" in wanted:
            n = 200_000 if quick else 1_000_000
            peers.map(n // 10)
            s = [peers.map(n) for _ in range(runs)]
            rows.append(row("process.map_tasks_per_s.python_pool", "tasks/s", "higher", s))
        if "roundtrip" in wanted:
            n = 300 if quick else 2_000
            peers.roundtrip(100)
            p50, p99 = [], []
            for _ in range(runs):
                lat = peers.roundtrip(n)
                p50.append(percentile(lat, 0.50))
                p99.append(percentile(lat, 0.99))
            rows.append(row("process.roundtrip_p50_us.python_ppe", "us", "lower", p50))
            rows.append(row("process.roundtrip_p99_us.python_ppe", "us", "lower", p99))
        if "startup" in wanted:
            for m, suffix in ((None, "python_ppe"), ("spawn", "python_ppe_spawn")):
                s = [peers.startup(m)[0] for _ in range(runs)]
                used = m or method
                rows.append(
                    row(f"process.startup_ms.{suffix}", "ms", "lower", s, f"start method {used}")
                )
        if "payload" in wanted:
            peers.payload(8 << 20)
            s = [peers.payload(8 << 20) for _ in range(runs)]
            rows.append(row("process.payload_8mib_mb_per_s.python_ppe", "MB/s", "higher", s))
    finally:
        peers.close()
    json.dump({"python": info(), "rows": rows}, sys.stdout, indent=2)
    sys.stdout.write("\n")


def main():
    all_rows = ["submit", "map", "roundtrip", "startup", "payload"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    parser.add_argument(
        "--rows",
        default=",".join(all_rows),
        help="comma-separated benchmarks to run (default: all): " + ",".join(all_rows),
    )
    parser.add_argument(
        "--serve", action="store_true", help="answer JSON requests on stdin (used by offload-bench)"
    )
    parser.add_argument(
        "--recycle",
        nargs=2,
        metavar=("N", "EVERY"),
        help="print the tasks/s of N tasks with max_tasks_per_child=EVERY (used by offload-bench)",
    )
    args = parser.parse_args()
    if args.recycle:
        print(recycle(int(args.recycle[0]), int(args.recycle[1])))
        return
    if args.serve:
        serve()
        return
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = wanted - set(all_rows)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    standalone(args.quick, wanted)


if __name__ == "__main__":
    main()
