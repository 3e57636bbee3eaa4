"""avg-serve under concurrent clients: requests/s and tokens/s with 1, 2 and 4 clients at
--parallel 1 (one request decoded at a time) and --parallel 4 (the decode steps of up to
four requests in one batched decoder call), in one run.

    python benchmarks/bench_server.py                 # the tiny model (32-token answers) and the demo
    python benchmarks/bench_server.py --models tiny --tiny-workloads text --text-requests 200

Each configuration is a real `avg-serve` on loopback with the vision cache off
(--image-cache 0: every request runs vision), fed by N client threads (one keep-alive
http.client connection each) that each send --text-requests text-only or --requests
image requests, non-streaming and greedy.  The tiny random model rarely says </s>, so
answers are --max-tokens tokens or nearly; it is run with text-only requests (prefill and
decode only: what slots batch) and with a different image per request (vision runs per
request, one at a time, and costs the tiny model more than its 32 decode steps).  The
demo answers in a few tokens, so there vision, router and prefill dominate.  Builds are
made in a temporary folder (the decoder's batch axis needs a build of this version).  Prints a markdown table
and, per client count, tokens/s at --parallel 4 over --parallel 1.  Each configuration is
measured --rounds times, interleaved with the other --parallel value's (both servers run
side by side, one loaded at a time), and reported as medians with the range of tokens/s.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_urls(n: int) -> list[str]:
    from avg_edge.model.tiny import textured_image

    urls = []
    for seed in range(n):
        buf = io.BytesIO()
        textured_image(320 + 16 * (seed % 4), 240, seed=seed).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _serve(build: Path, parallel: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-c", "from avg_edge.cli import serve_main; serve_main()", "-m", str(build), "--port",
           str(port), "--parallel", str(parallel), "--image-cache", "0", "--max-queue", "16",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"avg-serve did not start for {build}")


def _load(base: str, clients: int, requests: int, urls: list[str] | None, question: str, max_tokens: int):
    """`urls` None: text-only requests (no vision, no router: only prefill and decode)."""
    def client(c: int) -> tuple[int, int]:
        # http.client, one keep-alive connection per client: a light client, so that the
        # cores it shares with the server go to the server (httpx costs several times more).
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        done = tokens = 0
        try:
            for k in range(requests):
                if urls is None:
                    content: object = f"{question} ({c}, {k})"
                else:
                    url = urls[(c * requests + k) % len(urls)]
                    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
                body = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
                conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = json.loads(r.read())
                if r.status != 200:
                    raise SystemExit(f"HTTP {r.status}: {data}")
                tokens += data["usage"]["completion_tokens"]
                done += 1
        finally:
            conn.close()
        return done, tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - t0
    done, tokens = sum(r[0] for r in results), sum(r[1] for r in results)
    return done / seconds, tokens / seconds, tokens / max(done, 1)


def _builds(work: Path, models: list[str]) -> dict[str, Path]:
    from avg_edge.model.demo import CHECKPOINT as DEMO_CHECKPOINT
    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.model.tiny import make_tiny_checkpoint

    out = {}
    for name in models:
        ckpt = make_tiny_checkpoint(work / "tiny-ckpt", router=True) if name == "tiny" else DEMO_CHECKPOINT
        folder = work / f"{name}-fp32"
        print(f"building {name} into {folder} ...", file=sys.stderr, flush=True)
        build(BuildOptions(model=ckpt, output=folder, validate=False, backend="ort"), progress=lambda s: None)
        out[name] = folder
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    ap.add_argument("--requests", type=int, default=6, help="requests per client with an image")
    ap.add_argument("--text-requests", type=int, default=80,
                    help="requests per client, text-only (fast: more of them for a window of seconds)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3,
                    help="measurements per configuration, interleaved (--parallel 1, 4, 1, 4, ...: the servers of a "
                         "model run side by side), reported as medians: this shared machine drifts over seconds")
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="avg-serve --threads (ONNX Runtime threads per graph; 0: its default): each value is a "
                         "configuration of its own, with its own ratio")
    ap.add_argument("--tiny-workloads", nargs="+", default=["text", "image"], choices=["text", "image"],
                    help="the tiny model's requests: text-only (decode-bound) and/or with an image (vision-bound)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="avg-bench-server-"))
    builds = _builds(work, args.models)
    urls = _image_urls(8)
    questions = {"tiny": "What colour is the background?", "demo": "What colour is the background?"}
    rows, tok_s = [], {}
    runs = [(name, w, t) for name in builds for w in (args.tiny_workloads if name == "tiny" else ["image"])
            for t in args.threads]
    med = statistics.median
    for name, workload, threads in runs:
        servers = {}
        try:
            for parallel in args.parallel:
                servers[parallel] = _serve(builds[name], parallel, threads)
            use = None if workload == "text" else urls
            n = args.text_requests if workload == "text" else args.requests
            for _, base in servers.values():
                _load(base, 1, 1, use, questions[name], args.max_tokens)            # warm-up
            for clients in args.clients:
                got = {parallel: [] for parallel in args.parallel}
                for _ in range(args.rounds):
                    for parallel, (_, base) in servers.items():
                        got[parallel].append(_load(base, clients, n, use, questions[name], args.max_tokens))
                for parallel, runs_ in got.items():
                    rps, tps, per = (med(r[i] for r in runs_) for i in range(3))
                    tok_s[(name, workload, threads, parallel, clients)] = tps
                    rows.append(f"| {name} | {workload} | {threads or 'default'} | {parallel} | {clients} | {rps:.2f} "
                                f"| {tps:.1f} | {per:.1f} | {min(r[1] for r in runs_):.0f}-{max(r[1] for r in runs_):.0f} |")
                    print(rows[-1], file=sys.stderr, flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(f"| model | requests | --threads | --parallel | clients | requests/s | tokens/s | tokens/answer "
          f"| tokens/s, {args.rounds} rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    lo, hi = min(args.parallel), max(args.parallel)
    if lo != hi:
        print()
        for name, workload, threads in runs:
            ratios = ", ".join(f"{c} client{'s' if c > 1 else ''} "
                               f"{tok_s[(name, workload, threads, hi, c)] / tok_s[(name, workload, threads, lo, c)]:.2f}x"
                               for c in args.clients)
            print(f"{name} ({workload}, --threads {threads or 'default'}): tokens/s at --parallel {hi} over "
                  f"--parallel {lo}: {ratios}")


if __name__ == "__main__":
    main()
