"""Load test of the served live demo: 8 concurrent gradio_client clients × 25 queries each
against `python -m helpers serve` on 127.0.0.1 (the only address it targets), bounded in time.

    .venv/bin/python benchmarks/load_app.py [--clients 8] [--queries 25] [--deadline 600]

Uses the benchmark index of bench_app.py (demo model, 10,000 random unit gallery embeddings).
Each client sends a DeepFashion-sized JPEG with a box; its 13th query is a truncated file,
which must come back as a message (the server stays up). Reports failed requests, the server's
resident memory after warm-up and after the run, and per-request latency as the clients see it
(queueing included: queries run one at a time by design) and as the server computed it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_app import DEFAULT_INDEX, build_bench_index, cpu_name  # noqa: E402

HOST = "127.0.0.1"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {url} did not answer within {timeout:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def client_run(url: str, good: Path, bad: Path, box: str, n: int, deadline: float, out: dict, lock) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    for i in range(n):
        expect_error = i == 12
        start = time.perf_counter()
        try:
            remaining = max(1.0, deadline - time.monotonic())
            job = client.submit(handle_file(str(bad if expect_error else good)), None, box, 5, api_name="/search")
            gallery, message, _ = job.result(timeout=remaining)
            ok = message.startswith("⚠️") if expect_error else (len(gallery) == 5 and not message.startswith("⚠️"))
            problem = None if ok else f"unexpected answer: {message}"
        except Exception as error:  # a failed request is what this test counts, not a crash
            problem = f"{type(error).__name__}: {error}"
            message = ""
        elapsed = time.perf_counter() - start
        with lock:
            if problem:
                out["failures"].append(problem)
            elif expect_error:
                out["bad_answered"] += 1
            else:
                out["latency"].append(elapsed)
                served = re.search(r"answered in (\d+) ms", message)
                if served:
                    out["server_ms"].append(int(served.group(1)))
        if time.monotonic() > deadline:
            with lock:
                out["failures"].append("deadline reached before all queries were sent")
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=25, help="per client")
    parser.add_argument("--deadline", type=float, default=600, help="seconds; the test stops by itself")
    parser.add_argument("--index", type=Path, default=DEFAULT_INDEX)
    args = parser.parse_args()

    index_dir = build_bench_index(args.index)
    port = free_port()
    url = f"http://{HOST}:{port}/"
    server = subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--index", str(index_dir), "--host", HOST, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(url, server)
        from gradio_client import Client, handle_file

        root = Path(__import__("json").loads((index_dir / "index.json").read_text())["data_root"])
        good = sorted(root.glob("img/*/*/*/comsumer_*.jpg"))[0]
        bad = Path(index_dir.parent / "truncated.jpg")
        bad.write_bytes(good.read_bytes()[:300])
        box = "20,20,230,280"
        Client(url, verbose=False).predict(handle_file(str(good)), None, box, 5, api_name="/search")  # warm-up
        rss_before = rss_mib(server.pid)

        out = {"latency": [], "server_ms": [], "failures": [], "bad_answered": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + args.deadline
        start = time.perf_counter()
        threads = [
            threading.Thread(
                target=client_run, args=(url, good, bad, box, args.queries, deadline, out, lock), daemon=True
            )
            for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
        wall = time.perf_counter() - start
        rss_after = rss_mib(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    latency = np.asarray(out["latency"]) * 1000
    total = args.clients * args.queries
    print(f"machine: {cpu_name()}; server on {url}; {args.clients} clients × {args.queries} queries = {total}")
    print(
        f"answered: {len(latency)} searches + {out['bad_answered']} truncated uploads answered with a message; "
        f"failed: {len(out['failures'])}; server alive at the end: {alive}; wall {wall:.1f} s "
        f"({total / wall:.1f} queries/s)"
    )
    if len(latency):
        print(
            f"client-side latency (queueing included): p50 {np.percentile(latency, 50):.0f} ms, "
            f"p95 {np.percentile(latency, 95):.0f} ms, max {latency.max():.0f} ms"
        )
    if out["server_ms"]:
        print(
            f"server compute per query: p50 {np.percentile(out['server_ms'], 50):.0f} ms, "
            f"p95 {np.percentile(out['server_ms'], 95):.0f} ms"
        )
    print(
        f"server RSS: {rss_before:.0f} MiB after warm-up, {rss_after:.0f} MiB after the run "
        f"({rss_after - rss_before:+.0f} MiB)"
    )
    for problem in sorted(set(out["failures"]))[:5]:
        print("failure:", problem)
    sys.exit(1 if out["failures"] or not alive else 0)


if __name__ == "__main__":
    main()
