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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge.calibration.collect import record_inputs
from avg_edge.calibration.data import demo_samples, load_samples
from avg_edge.calibration.drift import DriftReport, answer_drift, output_drift
from avg_edge.calibration.quantize import quantize_int4, quantize_int8
from avg_edge.errors import BuildError, UsageError
from avg_edge.export.exporter import BuildOptions, BuildResult, GraphRow, build, build_engines, check_options, graph_bytes
from avg_edge.manifest import BuildCommit
from avg_edge.runtime.pipeline import Pipeline

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
    p = o.precision_info
    if p.quantizer is None:
        raise UsageError(f"build_quantized: expected a quantized precision (int8, int4), got {o.precision}")
    start = time.perf_counter()
    samples = load_samples(q.calib_data, q.calib_samples)          # bad data fails before any work
    evals = load_samples(q.eval_data, q.eval_samples) if q.eval_data else demo_samples(q.eval_samples, split="test")
    out = Path(o.output)
    opset = o.resolved_opset                                        # the precision table's opset policy
    with BuildCommit(out) as commit:
        tmp = commit.folder
        fp32_dir = commit.scratch() / "fp32"
        progress(f"[1/6] {p.exported_as} build (opset {opset}), validated against PyTorch:")
        fp32 = build(dataclasses.replace(o, output=fp32_dir, precision=p.exported_as, backend="ort", opset=opset,
                                         force=False), progress=lambda line: progress("      " + line))
        with Pipeline.load(fp32_dir, backend="ort") as pipe32:
            t0 = time.perf_counter()
            feeds = record_inputs(pipe32, samples)
            progress(f"[2/6] recorded graph inputs on {len(samples)} calibration samples "
                     f"({', '.join(f'{g}: {len(f)}' for g, f in feeds.items())}) ({time.perf_counter() - t0:.1f} s)")

            t0 = time.perf_counter()
            graph_files = {spec["file"]: name for name, spec in fp32.manifest.graphs.items()}
            methods = {}
            for f in sorted(fp32_dir.iterdir()):
                name = graph_files.get(f.name)
                if name is None:
                    if f.is_file() and f.name != C.MANIFEST_FILE and f.name.removesuffix(".data") not in graph_files:
                        shutil.copy2(f, tmp / f.name)      # tables, tokenizer
                elif p.quantizer == "int8":
                    methods[name] = quantize_int8(f, tmp / f.name, feeds[name])
                elif name == S.DECODER:
                    methods[name] = quantize_int4(f, tmp / f.name, q.block_size)
                else:
                    for part in fp32_dir.glob(f.name + "*"):
                        shutil.copy2(part, tmp / part.name)
                    methods[name] = {"method": "fp32 (int4 applies to the decoder's weights only)"}
            methods = {n: methods[n] for n in fp32.manifest.graphs}
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
        commit.finish(manifest)
        progress(f"[6/6] wrote {out} ({time.perf_counter() - t0:.1f} s)")
    g = report.graphs
    rows = [GraphRow(n, methods[n]["method"].split(" (")[0], graph_bytes(out, specs[n].file),
                     g[n]["outputs"]["max_abs_diff"], "drift", n in engines) for n in specs]
    return BuildResult(out, manifest, rows, time.perf_counter() - start, notes)


def drift_report(precision: str, fp32_dir: Path, q_dir: Path, manifest, pipe32: Pipeline, q: QuantOptions,
                 evals: list) -> DriftReport:
    held_out = record_inputs(pipe32, evals[: min(16, len(evals))], decode_steps=2)
    with Pipeline.load(q_dir, backend="ort", manifest=manifest) as qpipe:
        graphs = {}
        for name in manifest.graphs:
            outputs = [S.DecoderRoles(manifest.spec(name)).name(S.LOGITS)] if name == S.DECODER else None
            d = output_drift(pipe32.backends[name], qpipe.backends[name], held_out[name], outputs)
            graphs[name] = {"method": manifest.quantization["graphs"][name]["method"].split(" (")[0],
                            "outputs": dataclasses.asdict(d)}
        answers = answer_drift(pipe32, qpipe, evals, tokens=32)
    size = lambda folder, m: sum(graph_bytes(folder, s["file"]) for s in m.graphs.values())  # noqa: E731
    report = DriftReport(
        precision=precision, samples=len(evals), graphs=graphs, router_agreement=answers["router_agreement"],
        token_agreement=answers["token_agreement"], tokens=32, accuracy=answers["accuracy"],
        answer_nll=answers["answer_nll"], sizes={"fp32": size(fp32_dir, manifest), "quantized": size(q_dir, manifest)},
        speed=answers["speed"],
    )
    if report.accuracy is not None:
        report.threshold = {"max_accuracy_drop": q.max_accuracy_drop, "accept_drift": q.accept_drift,
                            "exceeded": report.accuracy["drop_points"] > q.max_accuracy_drop}
    else:
        report.threshold = {"max_accuracy_drop": q.max_accuracy_drop, "accept_drift": q.accept_drift, "exceeded": None,
                            "note": "no answers in the evaluation data: accuracy not measured"}
    return report
