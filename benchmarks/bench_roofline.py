"""Decode and prefill of a full-width model against this machine's roofline, and decode
step time against past length for both KV caches.

    python benchmarks/bench_roofline.py                 # 2 layers at the real widths
    python benchmarks/bench_roofline.py --layers 4 --work builds/bench-roofline

1. Memory bandwidth: the larger of numpy summing a 1 GiB float32 array (one thread) and
   ONNX Runtime's matrix-vector products over 16 chained 4096 x 4096 fp32 matrices (1 GiB,
   all threads; a decode step's access pattern).
   GEMM rate: the largest of ONNX Runtime's fp32 MatMul at 512 x 4096 x {4096, 11008}
   and 512 x 11008 x 4096.  Medians.
2. Builds (kept in --work and reused) of a full-width checkpoint with N decoder layers
   (`python -m avg_edge.model.tiny --preset 7b`): fp32 with the in-place cache, fp32 with
   the concat cache, int4 (W4A16, in place).  No validation (the build benchmark covers it).
3. Decode: tokens/s of the decoder graph at past 1000 against the bandwidth roofline,
   bandwidth / bytes read per token (the decoder's weight file + the K/V rows attended).
   Prefill: tokens/s of a 512-token prefill against the GEMM roofline,
   GEMM rate / (2 x decoder parameters per token).
4. Decode step time at past 100, 1000 and 3000 for the concat and in-place caches, and
   the ratio step(3000) / step(100).
Medians over --repeats, all in one run (ratios compare like with like).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1024**3


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _matmul_seconds(m: int, k: int, n: int, repeats: int) -> float:
    """Median seconds of ONNX Runtime's MatMul [m, k] x [k, n] fp32 (all threads)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    s = ort.InferenceSession(helper.make_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    del w, graph
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    return median_seconds(lambda: s.run(None, {"x": x}), repeats)


def _gemv_chain_seconds(layers: int, dim: int, repeats: int) -> float:
    """Median seconds of ONNX Runtime running `layers` chained fp32 MatMuls [1, dim] x
    [dim, dim]: a decode step's access pattern (one pass over many weight matrices)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((dim, dim), dtype=np.float32) / dim**0.5), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, [1, dim])], inits)
    s = ort.InferenceSession(helper.make_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    del inits, graph
    x = np.ones((1, dim), np.float32)
    return median_seconds(lambda: s.run(None, {"x": x}), repeats)


def bandwidth(repeats: int) -> dict[str, float]:
    """Read bandwidth, bytes/s, two ways: numpy summing a 1 GiB array (one thread) and ONNX
    Runtime's matrix-vector products over 16 fp32 matrices of 4096 x 4096 (1 GiB, all
    threads: what a decode step does).  The roofline uses the larger."""
    a = np.ones(GIB // 4, np.float32)
    numpy_sum = a.nbytes / median_seconds(lambda: a.sum(), repeats)
    del a
    gemv = GIB / _gemv_chain_seconds(16, 4096, repeats)
    return {"numpy sum (1 thread)": numpy_sum, "ORT 16 chained MatMuls 1x4096x4096 fp32": gemv}


def gemm_rate(repeats: int) -> dict[str, float]:
    """FLOP/s of ONNX Runtime's fp32 MatMul at a prefill's shapes (512 tokens; the
    decoder's 4096 -> 4096 and 4096 <-> 11008 products).  The roofline uses the largest."""
    shapes = ((512, 4096, 4096), (512, 4096, 11008), (512, 11008, 4096))
    return {f"ORT MatMul {m}x{k}x{n} fp32": 2 * m * k * n / _matmul_seconds(m, k, n, repeats) for m, k, n in shapes}


def ensure_build(ckpt: Path, out: Path, precision: str, kv_cache: str) -> Path:
    """int4 builds always validate (their drift is measured against the fp16 references)."""
    if not (out / "manifest.json").is_file():
        log = out.with_name(out.name + ".log")
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-c", "from avg_edge.cli import export_main; export_main()", "build",
                                "-m", str(ckpt), "-o", str(out), "--precision", precision, "--kv-cache", kv_cache,
                                *(["--no-validate"] if precision.startswith("fp") else []), "--backend", "ort",
                                "--force", "--eval-samples", "1"], stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise SystemExit(f"the {precision} {kv_cache} build failed; its output is in {log}")
    return out


class DecoderBench:
    """The build's decoder alone, driven the way the runtime drives it."""

    def __init__(self, folder: Path) -> None:
        from avg_edge import specs as S
        from avg_edge.runtime.pipeline import Pipeline

        self.folder = folder
        self.pipe = Pipeline.load(folder, backend="ort")
        self.dec = self.pipe.backends[S.DECODER]
        self.roles = self.pipe.decoder_roles
        self.logits = self.roles.name(S.LOGITS)
        self.hidden = self.pipe.manifest.hidden_size
        self.rng = np.random.default_rng(0)

    def prefill(self, n: int):
        aliases = self.roles.aliases()
        cache = self.roles.new_cache(self.dec.allocate if aliases else None)
        emb = self.rng.standard_normal((1, n, self.hidden)).astype(self.pipe.dtype)
        return self.dec.infer_kv(self.roles.prefill_feeds(emb, cache=cache), (self.logits,), aliases)

    def step_seconds(self, past: int, repeats: int) -> float:
        """Median time of one decode step after `past` tokens (each timed step starts from
        the same cache, so the past does not grow while timing)."""
        out = self.prefill(past)
        aliases = self.roles.aliases()
        emb = self.rng.standard_normal((1, 1, self.hidden)).astype(self.pipe.dtype)
        feeds = self.roles.step_feeds(emb, past, self.roles.next_past(out))
        return median_seconds(lambda: self.dec.infer_kv(feeds, (self.logits,), aliases), repeats)

    def bytes_per_token(self, past: int) -> int:
        """Weights read per decode step (the decoder's files) + the K/V rows attended."""
        weights = sum(p.stat().st_size for p in self.folder.glob(self.dec.spec.file + "*"))
        from avg_edge import specs as S

        cache = next(t.shape for t in self.roles.spec.inputs if t.role == S.PAST_KEY)  # [1, KV, len, head_dim]
        return weights + self.roles.layers * 2 * cache[1] * cache[-1] * past * self.pipe.dtype.itemsize

    def close(self) -> None:
        self.pipe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("builds/bench-roofline"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    bws, gemms = bandwidth(args.repeats), gemm_rate(args.repeats)
    bw, gemm = max(bws.values()), max(gemms.values())
    print("this machine: read bandwidth " + ", ".join(f"{v / 1e9:.1f} GB/s ({k})" for k, v in bws.items())
          + f" -> {bw / 1e9:.1f} GB/s; GEMM " + ", ".join(f"{v / 1e9:.1f} GFLOP/s ({k})" for k, v in gemms.items())
          + f" -> {gemm / 1e9:.1f} GFLOP/s\n")

    ckpt = args.work / f"ckpt-7b-{args.layers}"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "avg_edge.model.tiny", "--preset", "7b", "--layers", str(args.layers), str(ckpt)],
                       check=True, stdout=subprocess.DEVNULL)
    builds = {(p, k): ensure_build(ckpt, args.work / f"{p}-{k}", p, k)
              for p, k in (("fp32", "inplace"), ("fp32", "concat"), ("int4", "inplace"))}

    print(f"| decoder ({args.layers} layers, full width) | weights read per token | decode tok/s at past 1000 | "
          "bandwidth roofline tok/s | % of roofline | prefill 512 tok/s | GEMM roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for (precision, kv), folder in builds.items():
        if kv != "inplace":
            continue
        b = DecoderBench(folder)
        step = b.step_seconds(1000, args.repeats)
        read = b.bytes_per_token(1000)
        prefill = median_seconds(lambda: b.prefill(512), max(3, args.repeats // 2))
        params = _decoder_params(folder)
        roof_dec = bw / read
        roof_pre = gemm / (2 * params)
        print(f"| {precision} | {read / GIB:.2f} GiB | {1 / step:.2f} | {roof_dec:.2f} | {100 * step ** -1 / roof_dec:.0f}% | "
              f"{512 / prefill:.1f} | {roof_pre:.1f} | {100 * (512 / prefill) / roof_pre:.0f}% |")
        b.close()

    print("\n| KV cache | step at past 100 | past 1000 | past 3000 | step(3000) / step(100) |")
    print("|---|---|---|---|---|")
    for kv in ("concat", "inplace"):
        b = DecoderBench(builds[("fp32", kv)])
        ms = {p: 1000 * b.step_seconds(p, args.repeats) for p in (100, 1000, 3000)}
        print(f"| {kv} (fp32) | {ms[100]:.1f} ms | {ms[1000]:.1f} ms | {ms[3000]:.1f} ms | {ms[3000] / ms[100]:.2f}x |")
        b.close()


def _decoder_params(folder: Path) -> int:
    """Parameters of the decoder graph, from its initializers (without loading their data)."""
    import onnx

    from avg_edge.manifest import load_manifest

    m = load_manifest(folder)
    model = onnx.load(str(folder / m.spec("decoder").file), load_external_data=False)
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


if __name__ == "__main__":
    main()
