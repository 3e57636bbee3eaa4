"""Decode throughput of N requests one after another (Pipeline.decode) vs the same N in
DecodeSlots(N) (one batched decoder call per step), in one run, same tokens checked.

    python benchmarks/bench_slots.py                     # tiny random model, 4 requests, 32 tokens each
    python benchmarks/bench_slots.py -m CKPT -b BUILD --requests 4 --max-new-tokens 32

Each run times prefill + decode of all N requests (their vision, router and packing run
once before, outside the timing: they are the same work either way).  Tokens/s counts
every generated token over that wall time; "decode" counts the steps after each first
token over the time spent decoding (one after another: each request's first token to its
last, as Timings.eval; together: the last admit to the last token).  Medians over
--repeats runs after one warm-up.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

IMAGES = ((500, 380), (300, 600), (640, 480), (672, 336), (20, 30), (336, 1008), (900, 300), (400, 400))
QUESTIONS = ("What colour is the background?", "How many small dots are there?", "Describe the picture.",
             "What is in the top left corner?")


def one_after_another(pipe, prepared, n):
    t0 = time.perf_counter()
    ids, decode = [], 0.0
    for p in prepared:
        stream = pipe.decode(p, n)
        ids.append(list(stream))
        decode += stream.decode_seconds            # first token to last, as Timings.eval
    return ids, time.perf_counter() - t0, decode


def together(pipe, prepared, n):
    from avg_edge.runtime.slots import DecodeSlots

    slots = DecodeSlots(pipe, len(prepared))
    t0 = time.perf_counter()
    ids = {}
    for p in prepared:
        e = slots.admit(p, n)
        ids[e.slot] = [e.token] if e.token is not None else []
    t1 = time.perf_counter()
    while slots.active:
        for e in slots.step():
            if e.token is not None:
                ids[e.slot].append(e.token)
    end = time.perf_counter()
    slots.close()
    return [ids[s] for s in sorted(ids)], end - t0, end - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: a tiny random one)")
    ap.add_argument("-b", "--build", type=Path, help="its in-place fp32 build folder (made if missing)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--granularity", type=int, default=36)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = default)")
    args = ap.parse_args()

    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.model.tiny import make_tiny_checkpoint, textured_image
    from avg_edge.runtime.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="avg-bench-slots-"))
    ckpt = args.model or make_tiny_checkpoint(work / "tiny")
    build_dir = args.build or work / "build"
    if not (build_dir / "manifest.json").is_file():
        build(BuildOptions(model=ckpt, output=build_dir, validate=False, backend="ort", kv_cache="inplace",
                           max_context=args.max_context, max_batch=max(args.requests, 2)), progress=lambda s: None)
    pipe = Pipeline.load(build_dir, backend="ort", threads=args.threads)
    prepared = [pipe.prepare(textured_image(*IMAGES[i % len(IMAGES)], seed=i), QUESTIONS[i % len(QUESTIONS)],
                             args.granularity) for i in range(args.requests)]
    n = args.max_new_tokens

    one_after_another(pipe, prepared, n)                                   # warm-up
    together(pipe, prepared, n)
    seq = [one_after_another(pipe, prepared, n) for _ in range(args.repeats)]
    par = [together(pipe, prepared, n) for _ in range(args.repeats)]
    same = all(r[0] == seq[0][0] for r in seq + par)
    tokens = sum(len(i) for i in seq[0][0])
    steps = tokens - sum(1 for i in seq[0][0] if i)                        # tokens after each first one

    def rates(runs):
        return (statistics.median(tokens / r[1] for r in runs), statistics.median(steps / r[2] for r in runs),
                statistics.median(r[1] for r in runs))

    s_all, s_dec, s_wall = rates(seq)
    p_all, p_dec, p_wall = rates(par)
    print(f"model: {ckpt}\nbuild: {build_dir} ({pipe.describe_backend()}, decoder batch up to "
          f"{pipe.decoder_roles.max_batch})")
    print(f"{args.requests} requests, granularity {args.granularity}, prompts of "
          f"{[p.embeds.shape[1] for p in prepared]} tokens, answers of {[len(i) for i in seq[0][0]]} tokens "
          f"(max {n}); same tokens one after another and together: {'yes' if same else 'NO'}")
    print(f"| {args.requests} requests | one after another | DecodeSlots({args.requests}) | together / one after another |")
    print("|---|---|---|---|")
    print(f"| wall time (prefills + decode) | {s_wall * 1000:.1f} ms | {p_wall * 1000:.1f} ms | {s_wall / p_wall:.2f}x faster |")
    print(f"| tokens/s (all tokens over that time) | {s_all:.1f} | {p_all:.1f} | {p_all / s_all:.2f}x |")
    print(f"| decode tokens/s (steps after each first token) | {s_dec:.1f} | {p_dec:.1f} | {p_dec / s_dec:.2f}x |")
    if not same:
        raise SystemExit("the tokens differ between one after another and together")


if __name__ == "__main__":
    main()
