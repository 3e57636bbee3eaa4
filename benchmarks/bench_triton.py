"""The demo through Triton Inference Server against direct Pipeline calls, in one run.

    python benchmarks/bench_triton.py [--requests 24] [--orchestrators 2]

Needs the tritonserver that `make test` unpacks into build/tritonserver and the `triton`
extra.  The demo build (builds/avg-edge-demo, made if missing) is written as a Python-
backend repository (vision and router models on ONNX Runtime, the avg_edge orchestrator
calling them through BLS) and served on loopback.  The same mixed requests (the router
and fixed granularities, up to 16 tokens) go:
  - directly to one Pipeline in this process, one after another;
  - to Triton from 1 client, then from 4 concurrent clients (each request one gRPC stream).
Reports requests/s, mean latency, the ratios to direct calls and Triton's overhead per
request (1-client latency minus direct latency).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON_ROOT = ROOT / "build" / "tritonserver" / "pytriton" / "tritonserver"
CASES = [("demo-1.png", "What colour is the background?", None),
         ("demo-2.png", "What colour is the marker right of the white dot?", None),
         ("demo-2.png", "What colour is the marker right of the white dot?", 36),
         ("demo-1.png", "Which side is the large shape on?", 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--orchestrators", type=int, default=2)
    ap.add_argument("--build", type=Path, default=ROOT / "builds" / "avg-edge-demo")
    args = ap.parse_args()

    from avg_edge.export.triton import LocalTritonServer, TritonOptions, write_repository
    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.triton import ask

    if not (args.build / "manifest.json").is_file():
        from avg_edge.export.exporter import BuildOptions, build
        from avg_edge.model.demo import CHECKPOINT

        build(BuildOptions(model=CHECKPOINT, output=args.build, backend="ort"), progress=lambda s: None)
    reqs = [CASES[i % len(CASES)] for i in range(args.requests)]
    images = {name: (ROOT / "examples" / name).read_bytes() for name, _, _ in CASES}

    with Pipeline.load(args.build, backend="ort") as pipe:
        pipe.generate(images["demo-1.png"], "warm up", max_new_tokens=2)
        t0 = time.perf_counter()
        direct = [pipe.generate(images[i], q, granularity=g, max_new_tokens=16) for i, q, g in reqs]
        t_direct = time.perf_counter() - t0

    rows = [("direct Pipeline, 1 client", len(reqs) / t_direct, t_direct / len(reqs))]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(args.build, repo, TritonOptions(backend="python", orchestrators=args.orchestrators, threads=1))
        with LocalTritonServer(repo, TRITON_ROOT) as server:
            one = lambda r: ask(server.grpc_url, images[r[0]], r[1], granularity=r[2], max_tokens=16)  # noqa: E731
            for r in CASES:                                   # warm every instance's path
                one(r)
            for clients in (1, 4):
                latencies: list[float] = []

                def timed(r):
                    t = time.perf_counter()
                    out = one(r)
                    latencies.append(time.perf_counter() - t)
                    return out

                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    got = list(pool.map(timed, reqs))
                elapsed = time.perf_counter() - t0
                same = all((a.text, a.granularity) == (b.text, b.granularity) for a, b in zip(got, direct))
                if not same:
                    raise SystemExit("Triton's answers differ from the Pipeline's")
                rows.append((f"Triton ({args.orchestrators} orchestrators), {clients} client(s)",
                             len(reqs) / elapsed, sum(latencies) / len(latencies)))

    base_rps, base_lat = rows[0][1], rows[0][2]
    print(f"{len(reqs)} requests (router and fixed granularities, up to 16 tokens), demo build, ONNX Runtime CPU; "
          "the same answers on every path\n")
    print("| path | requests/s | vs direct | mean latency |")
    print("|---|---|---|---|")
    for name, rps, lat in rows:
        print(f"| {name} | {rps:.2f} | {rps / base_rps:.2f}x | {1000 * lat:.0f} ms |")
    print(f"\nTriton's overhead per request (1 client): {1000 * (rows[1][2] - base_lat):.0f} ms "
          f"(gRPC stream, two BLS calls with the features copied through shared memory, one response per piece)")


if __name__ == "__main__":
    main()
