"""What routing buys on the demo model (ONNX Runtime CPU), and what a process's first call costs.

    python benchmarks/bench_routing.py [--repeats 7] [--threads 0]

1. For the demo's coarse questions (the router sends them to few tokens): time to first
   token routed and at fixed 576, their ratio, the router's time and its share of the
   routed time to first token, and the share of the call spent outside backend calls.
   "ceiling" is fixed 576's time to first token over its preprocessing plus vision: the
   most any router could buy on this model if routing and the routed prefill were free
   (both are paid whatever the router picks).
   The follow-up row asks a second question about an already encoded image (the router
   graph's image part is kept; vision is not run again) against the same at fixed 576.
2. Cold start: in a fresh process (`Pipeline.load`, then one question), the first call's
   preprocessing and time outside backend calls against the median of the next calls.
Medians over --repeats after one warm-up; all in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "builds" / "avg-edge-demo"
QUESTIONS = [("demo-1.png", "What colour is the background?"), ("demo-2.png", "What colour is the background?"),
             ("demo-1.png", "Is the big shape on the left or on the right?")]

COLD = r"""
import json, sys, time
from avg_edge.runtime.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[1], backend="ort", threads=int(sys.argv[4]))
runs = [pipe.generate(sys.argv[2], sys.argv[3], max_new_tokens=1).timings for _ in range(6)]
print(json.dumps([{"preprocess": t.preprocess, "outside": t.overhead_share, "ttft": t.time_to_first_token} for t in runs]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if not (BUILD / "manifest.json").is_file():
        subprocess.run([sys.executable, "-c", "from avg_edge.cli import export_main; export_main()", "build", "--force"],
                       check=True, stdout=subprocess.DEVNULL)

    from avg_edge.runtime.pipeline import Pipeline

    med = statistics.median
    pipe = Pipeline.load(BUILD, backend="ort", threads=args.threads)
    print(f"build: {BUILD} ({pipe.describe_backend()})\n")
    print("| image / question | routed to | TTFT routed | TTFT fixed 576 | 576 / routed | router | router share "
          "| outside backend calls | ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for image, question in QUESTIONS:
        path = ROOT / "examples" / image

        def run(granularity):
            pipe.generate(path, question, granularity=granularity, max_new_tokens=1)              # warm-up
            return [pipe.generate(path, question, granularity=granularity, max_new_tokens=1).timings
                    for _ in range(args.repeats)]

        routed, fixed = run(None), run(576)
        chosen = pipe.generate(path, question, max_new_tokens=1).granularity
        ttft, ttft576 = med(t.time_to_first_token for t in routed), med(t.time_to_first_token for t in fixed)
        router = med(t.router for t in routed)
        paid = med(t.preprocess + t.vision for t in fixed)      # paid whatever the router picks
        print(f"| {image} / {question} | {chosen} | {1000 * ttft:.1f} ms | {1000 * ttft576:.1f} ms | {ttft576 / ttft:.2f}x "
              f"| {1000 * router:.1f} ms | {100 * router / ttft:.0f}% | {100 * med(t.overhead_share for t in routed):.0f}% | {ttft576 / paid:.2f}x |")

    # A follow-up question about the same image: vision and the router's image part are kept.
    image, question = ROOT / "examples" / "demo-1.png", "What colour is the background?"
    enc = pipe.encode_image(image)

    def follow_up(granularity):
        """(seconds from the question to its first token, router seconds) per run."""
        runs = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            prepared = pipe.prepare(enc, question, granularity)
            stream = pipe.decode(prepared, max_new_tokens=1)
            next(iter(stream))
            runs.append((time.perf_counter() - t0, prepared.timings.router))
            stream.close()
        return runs[1:]

    routed, fixed = follow_up(None), follow_up(576)
    t_r, t_f, router = med(r[0] for r in routed), med(r[0] for r in fixed), med(r[1] for r in routed)
    print(f"| follow-up question on an encoded image (no vision) | {pipe.prepare(enc, question).granularity} | "
          f"{1000 * t_r:.1f} ms | {1000 * t_f:.1f} ms | {t_f / t_r:.2f}x | {1000 * router:.2f} ms | "
          f"{100 * router / t_r:.1f}% | | |")
    pipe.close()

    out = subprocess.run([sys.executable, "-c", COLD, str(BUILD), str(ROOT / "examples" / "demo-1.png"),
                          "What colour is the background?", str(args.threads)], check=True, capture_output=True, text=True)
    runs = json.loads(out.stdout)
    first, rest = runs[0], runs[1:]
    print("\n| fresh process | first call | next calls (median) |")
    print("|---|---|---|")
    print(f"| image preprocess | {1000 * first['preprocess']:.1f} ms | {1000 * med(r['preprocess'] for r in rest):.1f} ms |")
    print(f"| time to first token | {1000 * first['ttft']:.1f} ms | {1000 * med(r['ttft'] for r in rest):.1f} ms |")
    print(f"| outside backend calls | {100 * first['outside']:.0f}% | {100 * med(r['outside'] for r in rest):.0f}% |")


if __name__ == "__main__":
    main()
