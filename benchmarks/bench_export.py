"""Export time, file sizes and ONNX Runtime CPU speed per precision and opset.

    python benchmarks/bench_export.py                      # a tiny random checkpoint
    python benchmarks/bench_export.py -m CKPT --opsets 18 20 23 --precisions fp32

Speeds are medians over --repeats runs at each graph's `opt` point, in one process,
so the ratios between opsets compare like with like.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_ms(session, feeds, repeats: int) -> float:
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: a fresh tiny random one)")
    ap.add_argument("--opsets", type=int, nargs="+", default=[18, 20, 23])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.specs import make_feeds
    from avg_edge.runtime.backends.ort_backend import OrtBackend
    from avg_edge.model.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="avg-bench-export-"))
    model = args.model or make_tiny_checkpoint(work / "tiny")
    print(f"model: {model}")
    print("| precision | opset | export s | vision | router | decoder | vision ms (opt) | prefill ms (opt) | decode ms (opt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        for opset in args.opsets:
            out = work / f"{precision}-{opset}"
            t0 = time.perf_counter()
            res = build(BuildOptions(model=model, output=out, precision=precision, opset=opset,
                                     max_context=args.max_context, validate=False, backend="ort"),
                        progress=lambda s: None)
            seconds = time.perf_counter() - t0
            sizes = {r.graph: f"{r.bytes / 1024:.0f} KB" for r in res.rows}
            speeds = {}
            for graph, point in (("vision", "default"), ("decoder", "prefill"), ("decoder", "decode")):
                spec = res.manifest.spec(graph)
                prof = next(p for p in spec.profiles if p.name == point)
                sizes_opt = {n: a.opt for n, a in prof.axes.items()}
                feeds = make_feeds(spec, sizes_opt, np.random.default_rng(0))
                speeds[(graph, point)] = _median_ms(OrtBackend(spec, out / spec.file, providers="cpu").session, feeds, args.repeats)
            print(f"| {precision} | {opset} | {seconds:.1f} | {sizes.get('vision')} | {sizes.get('router', '-')} | "
                  f"{sizes.get('decoder')} | {speeds[('vision', 'default')]:.1f} | {speeds[('decoder', 'prefill')]:.2f} | "
                  f"{speeds[('decoder', 'decode')]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
