"""`avg-export build`: checkpoint folder -> build folder (ONNX graphs, tables, tokenizer,
manifest, TensorRT engines where possible).

Everything is written through `manifest.BuildCommit`: into a hidden sibling folder that is
renamed into place at the very end, so a failed or killed build leaves the previous build
untouched and no folder the runtime would accept (the manifest is the last file written).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avg_edge import __version__
from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge.errors import AvgEdgeError, BackendUnavailable, BuildError, UsageError
from avg_edge.manifest import BuildCommit, Manifest
from avg_edge.precision import Precision, precision
from avg_edge.runtime.chat import DEFAULT_TEMPLATE
from avg_edge.runtime.packing import visual_token_count

BACKENDS = ("auto", "ort", "trt")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    output: Path
    precision: str = "fp32"
    backend: str = "auto"
    max_crops: int | None = None
    max_context: int | None = None
    opset: int | None = None                 # None: the precision's default (precision.PRECISIONS)
    validate: bool = True
    force: bool = False
    timing_cache: Path | None = None

    @property
    def precision_info(self) -> Precision:
        return precision(self.precision)

    @property
    def resolved_opset(self) -> int:
        return self.precision_info.opset(self.opset)


@dataclass
class GraphRow:
    graph: str
    precision: str
    bytes: int
    max_abs_diff: float | None
    validation: str
    engine: bool


@dataclass
class BuildResult:
    output: Path
    manifest: Manifest
    rows: list[GraphRow]
    seconds: float
    notes: list[str] = field(default_factory=list)


def check_options(o: BuildOptions) -> None:
    """Usage errors, before any work."""
    p = o.precision_info
    if o.backend not in BACKENDS:
        hint = " ('onnx' is now called 'ort')" if o.backend == "onnx" else ""
        raise UsageError(f"--backend: expected one of {list(BACKENDS)}, got {o.backend!r}{hint}")
    p.opset(o.opset)
    if not Path(o.model).is_dir():
        raise UsageError(f"model folder not found: {o.model} (expected a local checkpoint folder with config.json)")
    check_output(Path(o.output), o.force)
    if o.backend == "trt":
        from avg_edge.runtime.backends.trt_backend import probe

        try:
            probe()
        except BackendUnavailable as e:
            raise BackendUnavailable(f"--backend trt: {e}") from e


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    nearest = out.resolve().parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UsageError(f"cannot write the output {out}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK):
        raise UsageError(f"cannot write the output {out}: {nearest} is not writable")


def bounds_for(config, max_crops: int | None, max_context: int | None) -> S.Bounds:
    crop = config.crop_size
    fits = [(w, h) for w, h in config.pinpoints if 1 + (w // crop) * (h // crop) <= (max_crops or config.max_crops)]
    least = 1 + min((w // crop) * (h // crop) for w, h in config.pinpoints)
    if max_crops is not None and not least <= max_crops <= config.max_crops:
        raise UsageError(f"--max-crops: expected {least}..{config.max_crops} for this model's pinpoints, got {max_crops}")
    ctx_model = config.text.max_position_embeddings
    if max_context is not None and not 64 <= max_context <= ctx_model:
        raise UsageError(f"--max-context: expected 64..{ctx_model}, got {max_context}")
    finest = config.granularities[-1]
    max_visual = max(visual_token_count(finest, (w // crop, h // crop), (w, h)) for w, h in fits)
    return S.Bounds(max_crops=max_crops or config.max_crops, max_context=max_context or ctx_model,
                    min_visual=config.granularities[0], max_visual=max_visual)


def graph_specs(config, b: S.Bounds, precision_name: str) -> dict[str, S.GraphSpec]:
    dt = precision(precision_name).float_dtype           # quantized graphs keep fp32 I/O
    t = config.text
    out = {S.VISION: S.vision_spec(t.hidden_size, config.granularities, b, config.crop_size, dt)}
    if config.has_router:
        out[S.ROUTER] = S.router_spec(t.hidden_size, config.granularities, b, dt)
    out[S.DECODER] = S.decoder_spec(t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.vocab_size, b, dt)
    return out


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"avg_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build(o: BuildOptions, progress: Callable[[str], None] = print) -> BuildResult:
    """An fp32 or fp16 build (int8/int4: calibration.quantized_build.build_quantized)."""
    from avg_edge.export.graphs import graph_module, to_precision
    from avg_edge.export.onnx_export import export_graph
    from avg_edge.export.tokenizer_json import write_tokenizer_json
    from avg_edge.export.validate import GraphValidation, validate_graph, validate_wrapper
    from avg_edge.model import load_model

    check_options(o)
    p = o.precision_info
    if p.quantizer is not None:
        raise UsageError(f"--precision {o.precision}: use avg_edge.calibration.quantized_build.build_quantized")
    opset = o.resolved_opset
    start = time.perf_counter()
    out = Path(o.output)
    steps = _Steps(progress)
    done = steps.done
    with BuildCommit(out) as commit:
        tmp = commit.folder
        t0 = time.perf_counter()
        model = load_model(o.model)
        config = model.config
        b = bounds_for(config, o.max_crops, o.max_context)
        specs = graph_specs(config, b, o.precision)
        steps.total = 6 + len(specs)
        done(f"loaded {o.model} ({config.source_layout}, router: {'yes' if config.has_router else 'no'})", t0)

        t0 = time.perf_counter()
        how = write_tokenizer_json(Path(o.model), tmp / C.TOKENIZER_JSON_FILE)
        done(f"tokenizer.json {how}", t0)

        torch_dtype = TORCH_DTYPES[p.float_dtype]
        export_model = to_precision(model, torch_dtype)
        for name, spec in specs.items():
            t0 = time.perf_counter()
            export_graph(graph_module(name, export_model, spec), spec, tmp, opset)
            done(f"exported {spec.file} ({o.precision}, opset {opset})", t0)
        del export_model

        t0 = time.perf_counter()
        table = model.language_model.get_input_embeddings().weight.detach().to(torch_dtype).numpy()
        np.save(tmp / C.EMBED_TABLE_FILE, table, allow_pickle=False)
        np.save(tmp / C.IMAGE_NEWLINE_FILE, model.image_newline.detach().to(torch_dtype).numpy(), allow_pickle=False)
        done(f"wrote {C.EMBED_TABLE_FILE} {list(table.shape)} and {C.IMAGE_NEWLINE_FILE} ({p.float_dtype})", t0)

        t0 = time.perf_counter()
        validation: dict[str, GraphValidation] = {}
        wrapper_diff = None
        if o.validate:
            for name, spec in specs.items():
                v = validate_graph(graph_module(name, model, spec), spec, tmp / spec.file, p)
                validation[name] = v
                detail = v.reason if v.status == "skipped" else f"max abs diff {v.max_abs_diff:.2e} over {len(v.points)} points"
                progress(f"      {name}: {v.status}, {detail}")
            wrapper_diff = validate_wrapper(model, specs[S.DECODER])
            progress(f"      decoder code vs transformers' Llama: max abs diff {wrapper_diff:.2e}")
            done("validated against PyTorch", t0)
        else:
            done("validation skipped (--no-validate)", t0)
        failed = [n for n, v in validation.items() if v.status == "failed"]
        if wrapper_diff is not None and wrapper_diff > 1e-3:
            failed.append("decoder(code)")

        notes: list[str] = []
        t0 = time.perf_counter()
        engines, trt_info = build_engines(o, specs, tmp, notes) if not failed else ({}, None)
        if engines and o.validate:
            engine_checks = validate_engines(model, specs, tmp, engines, trt_info, p, progress)
            validation.update(engine_checks)
            failed += [n for n, v in engine_checks.items() if v.status == "failed"]
        done("TensorRT: " + ("built " + ", ".join(engines.values()) if engines else notes[-1] if notes else "skipped"), t0)

        manifest = Manifest(
            format_version=C.MANIFEST_FORMAT, precision=o.precision, opset=opset,
            granularities=list(config.granularities), pinpoints=[list(p) for p in config.pinpoints],
            crop_size=config.crop_size, image_mean=list(config.image_mean), image_std=list(config.image_std),
            chat_template=DEFAULT_TEMPLATE.to_dict(),
            bos_token_id=config.text.bos_token_id, eos_token_id=config.text.eos_token_id,
            context_length=b.max_context, hidden_size=config.hidden_size, has_router=config.has_router,
            graphs={n: s.to_dict() for n, s in specs.items()},
            validation={n: v.to_dict() for n, v in validation.items()} | (
                {"decoder_code_vs_transformers": wrapper_diff} if wrapper_diff is not None else {}),
            tools=tool_versions(), source={"model": str(Path(o.model).resolve()), "layout": config.source_layout},
            tensorrt=trt_info, engines=engines,
        )
        rows = [GraphRow(n, o.precision, graph_bytes(tmp, s.file), validation[n].max_abs_diff if n in validation else None,
                         validation[n].status if n in validation else "not run", n in engines) for n, s in specs.items()]
        if failed:
            raise BuildError(f"validation failed for {failed}: outputs differ from PyTorch beyond tolerance; "
                             f"the previous build at {out} is untouched (use --no-validate to keep such a build)")

        t0 = time.perf_counter()
        commit.finish(manifest)
        done(f"wrote {out}", t0)
        return BuildResult(out, manifest, rows, time.perf_counter() - start, notes)


class _Steps:
    """One numbered progress line per finished stage, with its elapsed time."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress, self.count, self.total = progress, 0, 0

    def done(self, what: str, t0: float) -> None:
        self.count += 1
        self.progress(f"[{self.count}/{self.total}] {what} ({time.perf_counter() - t0:.1f} s)")


def graph_bytes(folder: Path, file: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(file + "*"))


def build_engines(o: BuildOptions, specs: dict[str, S.GraphSpec], tmp: Path, notes: list[str]):
    """Engines beside the ONNX files.  With --backend auto a missing TensorRT or a failed
    engine build leaves a valid ONNX build and a note; with --backend trt it fails."""
    if o.backend == "ort":
        notes.append("engines not requested (--backend ort)")
        return {}, None
    from avg_edge.runtime.backends.trt_backend import build_engine, engine_file, probe, timing_cache_path

    try:
        gpu = probe()
    except BackendUnavailable as e:
        if o.backend == "trt":
            raise BackendUnavailable(f"--backend trt: {e}") from e
        notes.append(f"engines skipped: {e}")
        return {}, None
    cache = o.timing_cache or timing_cache_path(gpu)
    cache.parent.mkdir(parents=True, exist_ok=True)
    engines = {}
    for name, spec in specs.items():
        try:
            build_engine(tmp / spec.file, spec, tmp / engine_file(spec), cache)
        except AvgEdgeError as e:
            if o.backend == "trt":
                raise
            for f in engines.values():
                (tmp / f).unlink(missing_ok=True)
            notes.append(f"engines skipped: {e}")
            return {}, None
        engines[name] = engine_file(spec)
    return engines, gpu.to_manifest(cache)


def validate_engines(model, specs: dict[str, S.GraphSpec], tmp: Path, engines: dict[str, str], trt_info: dict,
                     p: Precision, progress: Callable[[str], None]):
    """TensorRT engines against PyTorch at the same points as the ONNX validation."""
    from avg_edge.export.graphs import graph_module
    from avg_edge.export.validate import validate_graph
    from avg_edge.runtime.backends.trt_backend import TrtBackend

    out = {}
    for name, engine in engines.items():
        with TrtBackend(specs[name], tmp / engine, trt_info) as backend:
            run = lambda feeds, b=backend: [b.infer(feeds)[n] for n in specs[name].output_names]  # noqa: E731
            v = validate_graph(graph_module(name, model, specs[name]), specs[name], tmp / specs[name].file, p, runner=run)
        progress(f"      {engine}: {v.status}, max abs diff {v.max_abs_diff:.2e} over {len(v.points)} points")
        out[f"{name}.engine"] = v
    return out
