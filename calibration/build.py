"""`avg-export build --precision int8|int4`: an fp32 build, calibrated on what each graph
really sees, quantized, measured against fp32, and refused past an accuracy threshold.

Steps: export + validate fp32 (as any build) in a scratch folder -> run the fp32 pipeline
on the calibration samples and record every graph's inputs -> quantize -> drift report on
separate evaluation samples (the demo test split unless --eval-data) -> engines ->
manifest -> rename into place.  A failure leaves the previous build untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from avg_edge import constants as C
from avg_edge.calibration.collect import record_inputs
from avg_edge.calibration.data import demo_samples, load_samples
from avg_edge.calibration.drift import DriftReport, answer_drift, output_drift
from avg_edge.calibration.quantize import INT4_OPSET, quantize_int4, quantize_int8
from avg_edge.errors import UsageError
from avg_edge.export import specs as S
from avg_edge.export.build import (BuildError, BuildOptions, BuildResult, GraphRow, build, build_engines,
                                   check_options, graph_bytes, swap_into_place)
from avg_edge.export.validate import ort_session

DRIFT_FILE = "drift_report.json"


@dataclass(frozen=True)
class QuantOptions:
    calib_data: Path | None = None       # None: the demo generator's calib split
    calib_samples: int = 32
    eval_data: Path | None = None        # None: the demo generator's test split
    eval_samples: int = 120
    max_accuracy_drop: float = 1.0       # points
    accept_drift: bool = False
    block_size: int = 32                 # int4


def build_quantized(o: BuildOptions, q: QuantOptions, progress: Callable[[str], None] = print) -> BuildResult:
    check_options(o)
    if o.precision not in ("int8", "int4"):
        raise UsageError(f"build_quantized: expected int8 or int4, got {o.precision}")
    start = time.perf_counter()
    samples = load_samples(q.calib_data, q.calib_samples)          # bad data fails before any work
    evals = load_samples(q.eval_data, q.eval_samples) if q.eval_data else demo_samples(q.eval_samples, split="test")
    out = Path(o.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        # int4's blocked DequantizeLinear needs opset 21; ONNX Runtime's int8 Q/DQ writer
        # produces an invalid model at 21+, so int8 exports at 20 at most.
        opset = max(o.opset, INT4_OPSET) if o.precision == "int4" else min(o.opset, 20)
        fp32_dir = work / "fp32"
        progress(f"[1/6] fp32 build (opset {opset}), validated against PyTorch:")
        fp32 = build(dataclasses.replace(o, output=fp32_dir, precision="fp32", backend="onnx", opset=opset, force=False),
                     progress=lambda line: progress("      " + line))
        from avg_edge.runtime.pipeline import Pipeline

        t0 = time.perf_counter()
        pipe32 = Pipeline.load(fp32_dir, backend="ort")
        feeds = record_inputs(pipe32, samples)
        progress(f"[2/6] recorded graph inputs on {len(samples)} calibration samples "
                 f"({', '.join(f'{g}: {len(f)}' for g, f in feeds.items())}) ({time.perf_counter() - t0:.1f} s)")

        t0 = time.perf_counter()
        shutil.copytree(fp32_dir, tmp)
        (tmp / C.MANIFEST_FILE).unlink()
        methods = {}
        for name, spec in fp32.manifest.graphs.items():
            src, dst = fp32_dir / spec["file"], tmp / spec["file"]
            if o.precision == "int8":
                methods[name] = quantize_int8(src, dst, feeds[name])
            elif name == S.DECODER:
                methods[name] = quantize_int4(src, dst, q.block_size)
            else:
                methods[name] = {"method": "fp32 (int4 applies to the decoder's weights only)"}
        progress("[3/6] quantized: " + "; ".join(f"{n}: {m['method']}" for n, m in methods.items())
                 + f" ({time.perf_counter() - t0:.1f} s)")

        t0 = time.perf_counter()
        manifest = dataclasses.replace(fp32.manifest, precision=o.precision, files={}, engines={}, tensorrt=None)
        manifest.validation = {**fp32.manifest.validation, "note": "graphs validated at fp32 before quantization; "
                               "what quantization changed is in the drift report"}
        manifest.quantization = {"graphs": methods, "calibration": {
            "source": str(q.calib_data) if q.calib_data else "demo generator, calib split", "samples": len(samples)}}
        report = drift_report(o.precision, fp32_dir, tmp, manifest, pipe32, q, evals)
        manifest.drift = report.to_dict()
        (tmp / DRIFT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        progress(f"[4/6] drift against fp32 ({time.perf_counter() - t0:.1f} s):")
        for line in report.summary_lines():
            progress("      " + line)
        if report.threshold.get("exceeded") and not q.accept_drift:
            raise BuildError(f"accuracy dropped {report.accuracy['drop_points']:.1f} points, more than "
                             f"--max-accuracy-drop {q.max_accuracy_drop}; the previous build at {out} is untouched "
                             "(--accept-drift keeps it anyway; `avg-export realign` may recover some)")

        t0 = time.perf_counter()
        notes: list[str] = []
        specs = {n: manifest.spec(n) for n in manifest.graphs}
        engines, trt_info = build_engines(o, specs, tmp, notes)
        manifest.engines, manifest.tensorrt = engines, trt_info
        progress("[5/6] TensorRT: " + ("built " + ", ".join(engines) if engines else notes[-1]) + f" ({time.perf_counter() - t0:.1f} s)")

        t0 = time.perf_counter()
        manifest.record_files(tmp)
        (tmp / C.MANIFEST_FILE).write_text(manifest.to_json())
        swap_into_place(tmp, out)
        progress(f"[6/6] wrote {out} ({time.perf_counter() - t0:.1f} s)")
        g = report.graphs
        rows = [GraphRow(n, methods[n]["method"].split(" (")[0], graph_bytes(out, specs[n].file),
                         g[n]["outputs"]["max_abs_diff"], "drift", n in engines) for n in specs]
        return BuildResult(out, manifest, rows, time.perf_counter() - start, notes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def drift_report(precision: str, fp32_dir: Path, q_dir: Path, manifest, pipe32, q: QuantOptions,
                 evals: list) -> DriftReport:
    from avg_edge.runtime.pipeline import Pipeline

    held_out = record_inputs(pipe32, evals[: min(16, len(evals))], decode_steps=2)
    graphs = {}
    for name, spec in manifest.graphs.items():
        outputs = ["logits"] if name == S.DECODER else [t["name"] for t in spec["outputs"]]
        d = output_drift(ort_session(fp32_dir / spec["file"]), ort_session(q_dir / spec["file"]), held_out[name], outputs)
        graphs[name] = {"method": manifest.quantization["graphs"][name]["method"].split(" (")[0],
                        "outputs": dataclasses.asdict(d)}
    qpipe = Pipeline.load(q_dir, backend="ort", manifest=manifest)
    answers = answer_drift(pipe32, qpipe, evals, tokens=32)
    size = lambda folder: sum(graph_bytes(folder, s["file"]) for s in manifest.graphs.values())  # noqa: E731
    report = DriftReport(
        precision=precision, samples=len(evals), graphs=graphs, router_agreement=answers["router_agreement"],
        token_agreement=answers["token_agreement"], tokens=32, accuracy=answers["accuracy"],
        sizes={"fp32": size(fp32_dir), "quantized": size(q_dir)}, speed=answers["speed"],
    )
    if report.accuracy is not None:
        report.threshold = {"max_accuracy_drop": q.max_accuracy_drop, "accept_drift": q.accept_drift,
                            "exceeded": report.accuracy["drop_points"] > q.max_accuracy_drop}
    else:
        report.threshold = {"max_accuracy_drop": q.max_accuracy_drop, "accept_drift": q.accept_drift, "exceeded": None,
                            "note": "no answers in the evaluation data: accuracy not measured"}
    return report
