"""`x-llama serve` under load: 1, 8 and 32 concurrent clients, each sending greedy /v1/completions requests one
after another; requests/s, completion tokens/s, p50/p99 latency and errors per level, the server's resident memory
after each level (when this script started the server), and the batching gain: tokens/s at the most clients over one
client. The largest level runs three times, so that memory growth from run to run (a leak: rows or caches not freed)
shows.

The server is `x-llama serve` over --checkpoint, started by this script as its own process on a free 127.0.0.1 port
(as users run it: its engine on its main thread, x_llama README "Which thread"), and stopped at the end; or --url
points at one already running (then --api_key if it has one).

    python benchmarks/serve_bench.py                                 # runs/x_llama/cpu, ~1 minute on 2 threads
    python benchmarks/serve_bench.py --quick                         # smoke run
    python benchmarks/serve_bench.py --compile                       # each decoding step compiled (serve --compile true)
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --clients 1 8 32
    python benchmarks/serve_bench.py --compile --compare_with /tmp/axon_old    # A/B against another checkout's engine

--compare_with CHECKOUT starts a second server whose x_llama and axon_shared come from CHECKOUT (e.g.
`git worktree add /tmp/axon_old HEAD~1`), alternates the two servers' levels over --rounds rounds, and prints each
side's tokens/s range and the per-round ratio (this tree / CHECKOUT).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = (
    "In the beginning",
    "To be, or not to be",
    "It is a truth universally acknowledged",
    "And the LORD said",
    "Call me",
    "Once upon a time",
)


def start_server(checkpoint: str, max_batch: int, compile: bool = False, checkout: str | None = None) -> tuple[str, subprocess.Popen]:
    """`x-llama serve` in a child process on a free port; returns its URL once /health answers (a compiling server
    first warms up its graphs, ~20 s for the `cpu` preset). With `checkout`, the server imports x_llama and
    axon_shared from that checkout instead of the installed ones."""
    with socket.socket() as sock:  # a free port (released just before the server binds it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from x_llama.cli import main; main(sys.argv[1:])", "serve"]
    command += ["--checkpoint", checkpoint, "--port", str(port), "--max_batch", str(max_batch), "--log_level", "warning"]
    command += ["--compile", "true"] if compile else []
    env = {**os.environ, "AXON_API_KEY": ""}  # no key: the benchmark sends none
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(Path(checkout) / package) for package in ("x_llama", "shared"))
    server = subprocess.Popen(command, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, server
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit(f"the server did not start (exit code {server.poll()}): {' '.join(command)}")
        time.sleep(0.5)


def resident_mib(pid: int, field: str = "VmRSS") -> float:
    """Process `pid`'s resident memory (VmRSS now, or VmHWM: the peak) from /proc, in MiB; nan off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_level(url: str, headers: dict, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    latencies, tokens, errors = [], [], 0
    lock = threading.Lock()

    def client(index: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
            for r in range(requests_per_client):
                body = {"prompt": PROMPTS[(index + r) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                try:
                    response = http.post("/v1/completions", json=body)
                    ok = response.status_code == 200
                    used = response.json()["usage"]["completion_tokens"] if ok else 0
                except httpx.HTTPError:
                    ok, used = False, 0
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - start)
                        tokens.append(used)
                    else:
                        errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] if latencies else float("nan")
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": p99,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/x_llama/cpu")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (split over its clients, at least 1 each)")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="8 requests of 8 tokens per level")
    parser.add_argument("--compile", action="store_true", help="the started server decodes with compiled steps (serve --compile true)")
    parser.add_argument("--compare_with", default=None, help="a checkout whose engine is served as the baseline (A/B)")
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds (with --compare_with)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 8, 8
    url, headers = args.url, {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.compare_with is not None:
        return compare(args)
    server = None
    if url is None:
        url, server = start_server(args.checkpoint, args.max_batch, args.compile)
    try:
        measure(url, headers, args, server.pid if server else None)
    finally:
        if server is not None:
            server.terminate()  # SIGTERM: the server stops as on Ctrl-C
            server.wait(timeout=30)


def compare(args: argparse.Namespace) -> None:
    """A/B: this tree's server against `args.compare_with`'s, both started here, their levels alternated (the order
    flips each round, so drift of the machine's speed hits both sides)."""
    servers = {
        "baseline": start_server(args.checkpoint, args.max_batch, args.compile, checkout=args.compare_with),
        "this tree": start_server(args.checkpoint, args.max_batch, args.compile),
    }
    tokens = {(name, clients): [] for name in servers for clients in args.clients}
    try:
        for url, _ in servers.values():
            run_level(url, {}, 1, 1, 4)  # warm-up
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                for clients in args.clients:
                    row = run_level(servers[name][0], {}, clients, max(1, args.requests // clients), args.max_tokens)
                    if row["errors"]:
                        raise SystemExit(f"{name}: {row['errors']} requests failed at {clients} clients")
                    tokens[name, clients].append(row["tokens_per_s"])
                    print(f"round {round_index} {name:>9} {clients:>3} clients: {row['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=30)
    for clients in args.clients:
        base, ours = tokens["baseline", clients], tokens["this tree", clients]
        ratios = sorted(b / a for a, b in zip(base, ours))
        print(
            f"{clients} clients: baseline {min(base):.0f}-{max(base):.0f}, this tree {min(ours):.0f}-{max(ours):.0f} tokens/s; "
            f"per-round ratio {ratios[0]:.3f}-{ratios[-1]:.3f}, median {statistics.median(ratios):.3f}"
        )


def measure(url: str, headers: dict, args: argparse.Namespace, pid: int | None) -> None:
    rss = (lambda field="VmRSS": resident_mib(pid, field)) if pid else (lambda field="VmRSS": float("nan"))
    run_level(url, headers, 1, 1, 4)  # warm-up
    before = rss()
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>6} {'RSS MiB':>8}")
    rows = []
    for clients in [*args.clients, max(args.clients), max(args.clients)]:  # the largest level 3 times: memory must not grow
        row = run_level(url, headers, clients, max(1, args.requests // clients), args.max_tokens)
        row["rss_mib"] = rss()
        rows.append(row)
        print(
            f"{row['clients']:>7} {row['requests']:>8} {row['requests_per_s']:>7.2f} {row['tokens_per_s']:>9.1f} "
            f"{row['p50_s']:>7.3f} {row['p99_s']:>7.3f} {row['errors']:>6} {row['rss_mib']:>8.0f}"
        )
    one = next((r for r in rows if r["clients"] == 1), None)
    if one is not None and max(args.clients) > 1:
        gain = rows[-1]["tokens_per_s"] / one["tokens_per_s"]
        print(f"batching gain: {max(args.clients)} clients give {gain:.2f}x the tokens/s of one client (target >= 4x)")
    print(f"errors in all: {sum(r['errors'] for r in rows)}")
    if pid:
        repeats = ", ".join(f"{r['rss_mib']:.0f}" for r in rows[-3:])
        print(
            f"server memory: {before:.0f} MiB after warm-up; {repeats} MiB after each run of the largest level; peak {rss('VmHWM'):.0f} MiB"
        )


if __name__ == "__main__":
    main()
