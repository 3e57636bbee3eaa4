"""`avg-export build --precision int8|int4`: a float build, quantized, measured against
that float build, and refused past an accuracy threshold.

Steps: export + validate the precision's float dtype (fp32 for int8, fp16 for int4) as
any build, in a scratch folder -> int8: run the float pipeline on the calibration
samples and record every graph's inputs -> quantize (int4: matrix by matrix) ->
references of the quantized graphs -> drift report on separate evaluation samples (the
demo test split unless --eval-data) -> engines -> manifest -> rename into place.  A
failure leaves the previous build untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge import validation as V
from avg_edge.calibration.collect import record_inputs
from avg_edge.calibration.data import demo_samples, load_samples
from avg_edge.calibration.drift import DriftReport, answer_drift, answer_pass, graph_outputs, output_drift
from avg_edge.calibration.quantize import quantize_int4, quantize_int8
from avg_edge.errors import BuildError, UsageError
from avg_edge.export.exporter import BuildOptions, BuildResult, GraphRow, build, build_engines, check_options, graph_bytes
from avg_edge.manifest import BuildCommit
from avg_edge.runtime.backends.ort_backend import OrtBackend
from avg_edge.runtime.phases import Phases, release_memory
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
    """Export + validate at the precision's float dtype, quantize, measure the drift, commit.
    Memory: int4 quantizes matrix by matrix from the fp16 export; the float and the
    quantized pipelines run one after the other."""
    check_options(o)
    p = o.precision_info
    if p.quantizer is None:
        raise UsageError(f"build_quantized: expected a quantized precision (int8, int4), got {o.precision}")
    if not o.validate:
        raise UsageError(f"--no-validate: an {o.precision} build measures its drift against the validated "
                         f"{p.exported_as} graphs' PyTorch references, so it always validates; drop --no-validate")
    start = time.perf_counter()
    samples = load_samples(q.calib_data, q.calib_samples) if p.quantizer == "int8" else []   # bad data fails early
    evals = load_samples(q.eval_data, q.eval_samples) if q.eval_data else demo_samples(q.eval_samples, split="test")
    out = Path(o.output)
    opset = o.resolved_opset                                        # the precision table's opset policy
    ph = Phases(progress, total=7)
    with BuildCommit(out) as commit:
        tmp = commit.folder
        float_dir = commit.scratch() / p.exported_as
        with ph.phase(f"{p.exported_as} build (opset {opset}), validated against PyTorch (above)"):
            fbuild = build(dataclasses.replace(o, output=float_dir, precision=p.exported_as, backend="ort", opset=opset,
                                               force=False, kv_cache=o.resolved_kv_cache), phases=ph.nested())
        feeds: dict[str, list] = {}
        with ph.phase("calibration inputs") as detail:
            if p.quantizer == "int8":
                with Pipeline.load(float_dir, backend="ort") as fpipe:
                    feeds = record_inputs(fpipe, samples)
                detail.text = (f"recorded on {len(samples)} samples ("
                               + ", ".join(f"{g}: {len(f)}" for g, f in feeds.items()) + ")")
            else:
                detail.text = "none needed (int4 is weight-only)"

        with ph.phase("quantize") as detail:
            graph_files = {spec["file"]: name for name, spec in fbuild.manifest.graphs.items()}
            methods = {}
            for f in sorted(float_dir.iterdir()):
                name = graph_files.get(f.name)
                if name is None:
                    if f.is_file() and f.name not in (C.MANIFEST_FILE, C.REFERENCE_FILE) \
                            and f.name.removesuffix(".data") not in graph_files:
                        os.link(f, tmp / f.name)                     # tables, tokenizer: same bytes
                elif p.quantizer == "int8":
                    methods[name] = quantize_int8(f, tmp / f.name, feeds[name])
                elif name == S.DECODER:
                    methods[name] = quantize_int4(f, tmp / f.name, q.block_size)
                else:
                    for part in float_dir.glob(f.name + "*"):
                        os.link(part, tmp / part.name)
                    methods[name] = {"method": f"{p.exported_as} (int4 applies to the decoder's weights only)"}
            methods = {n: methods[n] for n in fbuild.manifest.graphs}
            detail.text = "; ".join(f"{n}: {m['method']}" for n, m in methods.items())
        feeds.clear()
        release_memory()

        manifest = dataclasses.replace(fbuild.manifest, precision=o.precision, files={}, engines={}, tensorrt=None)
        manifest.quantization = {"graphs": methods, "calibration": {
            "source": str(q.calib_data) if q.calib_data else "demo generator, calib split", "samples": len(samples)}
            if samples else None}
        with ph.phase("references of the quantized graphs (ONNX Runtime)") as detail:
            manifest.validation = quantized_references(fbuild, manifest, methods, float_dir, tmp, p)
            detail.text = ", ".join(n for n, m in methods.items() if not m["method"].startswith(p.exported_as))

        with ph.phase(f"drift against {p.exported_as}") as detail:
            report = drift_report(o.precision, p.exported_as, float_dir, tmp, manifest, q, evals)
            manifest.drift = report.to_dict()
            (tmp / DRIFT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
            detail.text = f"on {len(evals)} samples:"
        for line in report.summary_lines():
            progress("      " + line)
        if report.threshold.get("exceeded") and not q.accept_drift:
            raise BuildError(f"accuracy dropped {report.accuracy['drop_points']:.1f} points, more than "
                             f"--max-accuracy-drop {q.max_accuracy_drop}; the previous build at {out} is untouched "
                             "(--accept-drift keeps it anyway; `avg-export realign` may recover some)")

        notes: list[str] = []
        specs = {n: manifest.spec(n) for n in manifest.graphs}
        with ph.phase("TensorRT") as detail:
            engines, trt_info = build_engines(o, specs, tmp, notes)
            manifest.engines, manifest.tensorrt = engines, trt_info
            detail.text = "built " + ", ".join(engines) if engines else notes[-1]
        with ph.phase(f"write {out}"):
            manifest.phases = ph.to_list()
            commit.finish(manifest)
    g = report.graphs
    rows = [GraphRow(n, methods[n]["method"].split(" (")[0], graph_bytes(out, specs[n].file),
                     g[n]["outputs"]["max_abs_diff"], "drift", n in engines) for n in specs]
    return BuildResult(out, manifest, rows, time.perf_counter() - start, notes)


def quantized_references(fbuild: BuildResult, manifest, methods: dict, float_dir: Path, q_dir: Path, p) -> dict:
    """reference.npz for the quantized build: PyTorch's references for the graphs left in
    float, ONNX Runtime's outputs of the quantized graphs at the same points (what an
    engine built from them is checked against).  Returns the manifest's validation."""
    refs = V.load_references(float_dir / C.REFERENCE_FILE)
    validation = {**fbuild.manifest.validation}
    for name, m in methods.items():
        if m["method"].startswith(p.exported_as):
            continue
        spec = manifest.spec(name)
        points = V.points_from_manifest(validation[name])
        with OrtBackend(spec, q_dir / spec.file, providers="cpu", quantized=True) as backend:
            for pt in points:
                for out_name, values in V.compared(spec, pt, backend.infer(pt.feeds(spec), check=False)).items():
                    refs[V.key(name, pt.name, out_name)] = values
        validation[name] = {**validation[name], "against": f"ONNX Runtime on the quantized graph "
                            f"({p.exported_as} graph validated against PyTorch first)"}
        release_memory()
    V.save_references(q_dir / C.REFERENCE_FILE, refs)
    return validation


def drift_report(precision: str, reference: str, float_dir: Path, q_dir: Path, manifest, q: QuantOptions,
                 evals: list) -> DriftReport:
    """The float build, then the quantized one, on the same inputs (one pipeline at a time)."""
    held = evals[: min(4, len(evals))]
    with Pipeline.load(float_dir, backend="ort") as fpipe:
        held_feeds = record_inputs(fpipe, held, decode_steps=2)
        ref_outputs = graph_outputs(fpipe, held_feeds)
        ref_answers = answer_pass(fpipe, evals, tokens=32)
        has_router = fpipe.manifest.has_router
    release_memory()
    with Pipeline.load(q_dir, backend="ort", manifest=manifest) as qpipe:
        q_outputs = graph_outputs(qpipe, held_feeds)
        q_answers = answer_pass(qpipe, evals, tokens=32, nll_at=[r.granularity for r in ref_answers])
    release_memory()
    graphs = {name: {"method": manifest.quantization["graphs"][name]["method"].split(" (")[0],
                     "outputs": dataclasses.asdict(output_drift(ref_outputs[name], q_outputs[name]))}
              for name in manifest.graphs}
    answers = answer_drift(ref_answers, q_answers, evals, has_router, tokens=32)
    size = lambda folder: sum(graph_bytes(folder, s["file"]) for s in manifest.graphs.values())  # noqa: E731
    report = DriftReport(
        precision=precision, reference=reference, samples=len(evals), graphs=graphs,
        router_agreement=answers["router_agreement"], token_agreement=answers["token_agreement"], tokens=32,
        accuracy=answers["accuracy"], answer_nll=answers["answer_nll"],
        sizes={"reference": size(float_dir), "quantized": size(q_dir)}, speed=answers["speed"],
    )
    exceeded = None if report.accuracy is None else report.accuracy["drop_points"] > q.max_accuracy_drop
    report.threshold = {"max_accuracy_drop": q.max_accuracy_drop, "accept_drift": q.accept_drift, "exceeded": exceeded}
    if report.accuracy is None:
        report.threshold["note"] = "no answers in the evaluation data: accuracy not measured"
    return report
