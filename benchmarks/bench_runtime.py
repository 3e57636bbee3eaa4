"""Runtime (ONNX Runtime CPU) vs the PyTorch reference on the same model, image and
question, with the same greedy tokens, in one run.

    python benchmarks/bench_runtime.py                         # the demo model if built, else tiny random
    python benchmarks/bench_runtime.py -m CKPT -b BUILD --granularity 576

Reports time to first token and decode tokens/s for both, their ratios, and the
runtime's own overhead (time outside backend calls as a share of the total).
Medians over --repeats runs after one warm-up.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _reference_run(model, image, question, granularity, max_new_tokens):
    """The reference's generate, timed the same way the runtime times itself."""
    t0 = time.perf_counter()
    prep = model.prepare(image, question, granularity)
    eos = model.config.text.eos_token_id
    with torch.no_grad():
        out = model.language_model(inputs_embeds=prep.inputs_embeds, use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - t0
        ids = []
        t1 = time.perf_counter()
        nxt = int(out.logits[0, -1].argmax())
        while nxt != eos and len(ids) < max_new_tokens:
            ids.append(nxt)
            out = model.language_model(input_ids=torch.tensor([[nxt]]), cache=out.cache, use_cache=True, logits_to_keep=1)
            nxt = int(out.logits[0, -1].argmax())
        decode = time.perf_counter() - t1
    return ids, prep.granularity, ttft, (len(ids) - 1) / decode if len(ids) > 1 and decode else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, help="checkpoint folder")
    ap.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (long greedy answers: measures decode)")
    ap.add_argument("-b", "--build", type=Path, help="its fp32 build folder (made if missing)")
    ap.add_argument("--granularity", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads and torch threads (0 = default)")
    args = ap.parse_args()

    from avg_edge.model.demo import CHECKPOINT as DEMO_CHECKPOINT
    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.model import load_model
    from avg_edge.model.tiny import make_tiny_checkpoint
    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.image import load_image

    work = Path(tempfile.mkdtemp(prefix="avg-bench-rt-"))
    use_demo = not args.tiny and (DEMO_CHECKPOINT / "config.json").is_file()
    ckpt = args.model or (DEMO_CHECKPOINT if use_demo else make_tiny_checkpoint(work / "tiny"))
    build_dir = args.build or work / "build"
    if not (build_dir / "manifest.json").is_file():
        build(BuildOptions(model=ckpt, output=build_dir, validate=False, backend="ort"), progress=lambda s: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(ckpt)
    pipe = Pipeline.load(build_dir, backend="ort", threads=args.threads)
    demo_images = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.png"))
    if demo_images and not args.tiny:
        image = load_image(demo_images[0])
    else:
        from avg_edge.model.tiny import textured_image

        image = textured_image(640, 480)
    question = "What colour is the background?"
    gran = None if args.granularity == "auto" else int(args.granularity)

    _reference_run(model, image, question, gran, args.max_new_tokens)          # warm-up
    pipe.generate(image, question, granularity=gran, max_new_tokens=args.max_new_tokens)
    ref_runs = [_reference_run(model, image, question, gran, args.max_new_tokens) for _ in range(args.repeats)]
    rt_runs = [pipe.generate(image, question, granularity=gran, max_new_tokens=args.max_new_tokens) for _ in range(args.repeats)]
    ref_ids, ref_gran = ref_runs[0][0], ref_runs[0][1]
    same = all(r.token_ids == ref_ids and r.granularity == ref_gran for r in rt_runs)

    ref_ttft = statistics.median(r[2] for r in ref_runs)
    ref_rate = statistics.median(r[3] for r in ref_runs)
    rt_ttft = statistics.median(r.timings.time_to_first_token for r in rt_runs)
    rt_rate = statistics.median(r.timings.eval_rate for r in rt_runs)
    overhead = statistics.median(r.timings.overhead_share for r in rt_runs)
    r0 = rt_runs[0]
    print(f"model: {ckpt}\nbuild: {build_dir} ({pipe.describe_backend()})")
    print(f"image {image.size[0]}x{image.size[1]}, granularity {r0.granularity} ({r0.visual_tokens} visual tokens), "
          f"{len(ref_ids)} tokens, same greedy tokens: {'yes' if same else 'NO'}")
    print("| | PyTorch reference | runtime (ORT CPU) | runtime / reference |")
    print("|---|---|---|---|")
    ratio = ref_ttft / rt_ttft
    verdict = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    print(f"| time to first token | {ref_ttft * 1000:.1f} ms | {rt_ttft * 1000:.1f} ms | {verdict} |")
    if ref_rate and rt_rate:
        print(f"| decode | {ref_rate:.1f} tok/s | {rt_rate:.1f} tok/s | {rt_rate / ref_rate:.2f}x |")
    else:
        print("| decode | (answer is one token: run with --tiny to measure decode) | | |")
    print(f"| runtime time outside backend calls | | {100 * overhead:.1f}% | |")
    if not same:
        raise SystemExit("greedy tokens differ between the runtime and the reference")


if __name__ == "__main__":
    main()
