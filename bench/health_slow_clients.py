"""/health latency while slow clients hold connections open, against the real server as `make serve` starts it.

One run starts ``python -m ml_backend.cli serve`` with its default settings (waitress, ``TAXOMOCO_HTTP_THREADS``
default) and probes ``GET /health`` on a new connection each time, as Label Studio does (its timeout is 1 s):

1. with no other client (the baseline);
2. for each N in ``--slow``, while N slow clients hold connections open: a third trickle a request line, a third
   their headers, a third a /predict body announced at 100 kB; each sends one more byte every second and never
   finishes (a slowloris).

Each phase reports p50 / p99 / max of the probes and how many took over 1 s or failed (no answer within
:data:`PROBE_TIMEOUT_S`; a phase stops after :data:`STOP_AFTER_FAILURES` failures in a row). Past the server's
``CONNECTION_LIMIT`` (``ml_backend.http.server``) new connections wait in the listen backlog: the last row shows it.

Usage: ``.venv/bin/python bench/health_slow_clients.py [--probes 200] [--slow 40 200 1100] [--out FILE]``
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ml_backend.http.server import CONNECTION_LIMIT  # noqa: E402

PREFIXES = (
    b"GET /hea",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty",
    b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"tasks": [',
)
"""What a slow client sends first: part of a request line, part of the headers, the start of a body."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROBE_TIMEOUT_S = 3.0
STOP_AFTER_FAILURES = 10
"""A phase ends early after this many failed probes in a row (the server is unreachable; the count says so)."""


def probe(port: int, timeout: float = PROBE_TIMEOUT_S) -> float | None:
    """Seconds for one ``GET /health`` on a new connection; None when it failed."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return None
    return time.perf_counter() - t0 if ok else None


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        if probe(port, 1.0) is not None:
            return
        time.sleep(0.3)
    raise RuntimeError("the server did not come up")


class SlowClients:
    """``n`` connections that trickle one byte a second and never finish their request."""

    def __init__(self, port: int, n: int) -> None:
        self.sockets: list[socket.socket] = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(PREFIXES[i % len(PREFIXES)])
            self.sockets.append(s)
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            for s in self.sockets:
                try:
                    s.send(b"x")
                except OSError:
                    self.closed += 1

    def close(self) -> int:
        """Stop; the number of sends that failed (connections the server closed)."""
        self._stop.set()
        self._thread.join(5)
        for s in self.sockets:
            s.close()
        return self.closed


def phase(port: int, probes: int) -> dict:
    lat: list[float] = []
    failed = in_a_row = sent = 0
    for _ in range(probes):
        t = probe(port)
        sent += 1
        if t is None:
            failed += 1
            in_a_row += 1
            if in_a_row >= STOP_AFTER_FAILURES:
                break
        else:
            lat.append(t)
            in_a_row = 0
        time.sleep(0.02)
    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max()),
            "over_1s": int((arr > 1.0).sum()), "failed": failed, "n": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=200, help="/health probes per phase")
    parser.add_argument("--slow", type=int, nargs="+", default=[40, 200, 1100], help="numbers of slow clients")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "health_slow_clients.txt")
    args = parser.parse_args()
    load_before = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TAXOMOCO_", "BASIC_AUTH_", "LABEL_STUDIO_"))}
        env.update({"TAXOMOCO_HOST": "127.0.0.1", "TAXOMOCO_PORT": str(port), "MODEL_DIR": tmp, "LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(ROOT)})
        proc = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "serve"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_up(port, proc)
            rows = [("none", phase(port, args.probes), 0)]
            for n in args.slow:
                slow = SlowClients(port, n)
                time.sleep(2.0)  # let them trickle first
                result = phase(port, args.probes)
                rows.append((str(n), result, slow.close()))
        finally:
            proc.terminate()
            proc.wait(30)
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = [
        "# /health with slow clients holding connections (bench/health_slow_clients.py)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()} "
        f"(load average before the run: {load_before}); `taxomoco serve` with default settings (waitress, "
        "TAXOMOCO_HTTP_THREADS default), embedded trainer idle; each probe a new connection on loopback; slow clients "
        "send one byte a second and never finish (request line / headers / body, a third each); a probe fails without an "
        f"answer in {PROBE_TIMEOUT_S:g} s. The server holds at most {CONNECTION_LIMIT} connections (CONNECTION_LIMIT): "
        "past it, a flood must be stopped in front of it (the TLS proxy of the recommended deployment).",
        f"Command: `python bench/health_slow_clients.py --probes {args.probes} --slow {' '.join(map(str, args.slow))}`",
        "",
        "| slow clients | probes | p50 ms | p99 ms | max ms | over 1 s | failed | slow connections closed by the server |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r, closed in rows:
        lines.append(f"| {name} | {r['n']} | {ms(r['p50'])} | {ms(r['p99'])} | {ms(r['max'])} | {r['over_1s']} | "
                     f"{r['failed']} | {closed} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
