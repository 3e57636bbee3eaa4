"""`avg-export build`: checkpoint folder -> build folder (ONNX graphs, tables, tokenizer,
manifest, TensorRT engines where possible).

Everything is written through `manifest.BuildCommit`: into a hidden sibling folder that is
renamed into place at the very end, so a failed or killed build leaves the previous build
untouched and no folder the runtime would accept (the manifest is the last file written).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avg_edge import __version__
from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge import validation as V
from avg_edge.errors import AvgEdgeError, BackendUnavailable, BuildError, UsageError
from avg_edge.manifest import BuildCommit, Manifest
from avg_edge.precision import Precision, precision
from avg_edge.runtime.backends.ort_backend import OrtBackend
from avg_edge.runtime.chat import DEFAULT_TEMPLATE
from avg_edge.runtime.packing import visual_token_count
from avg_edge.runtime.phases import GIB, Phases, release_memory

BACKENDS = ("auto", "ort", "trt")
MAX_BATCH_LIMIT = 64        # --max-batch: a sanity bound (each row is a whole context of cache)
# The default --max-batch: up to C.DEFAULT_MAX_BATCH requests while their whole-context KV
# cache stays within this.  Validation holds several copies of a batched point's cache
# (the feeds, the reference's, ONNX Runtime's): a 7B fp16 build at 4096 tokens (2 GiB of
# cache a request) keeps batch 1, as its measured peak memory has no room for more.
BATCH_CACHE_BUDGET = 1024**3
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
    kv_cache: str = "auto"                   # auto | concat | inplace (see resolved_kv_cache)
    max_batch: int | None = None             # requests per decode step (in place only); None: auto_max_batch
    cache_op: str = "auto"                   # auto | gqa | tensorscatter: the in-place cache's operators

    def resolved_max_batch(self, cache_bytes_per_request: int) -> int:
        """The decoder's batch bound: 1 for the concat cache (TensorRT, quantized builds),
        else --max-batch, else `auto_max_batch`."""
        if self.resolved_kv_cache == "concat":
            return 1
        return auto_max_batch(cache_bytes_per_request) if self.max_batch is None else self.max_batch

    @property
    def precision_info(self) -> Precision:
        return precision(self.precision)

    @property
    def resolved_opset(self) -> int:
        if self.resolved_cache_op in S.CACHE_OP_OPSET:   # its operators exist from that opset on
            return S.CACHE_OP_OPSET[self.resolved_cache_op]
        return self.precision_info.opset(self.opset)

    @property
    def resolved_cache_op(self) -> str | None:
        """The in-place cache's operators (None for concat): gqa, ONNX Runtime's
        GroupQueryAttention (attends over the valid rows only; ONNX Runtime only), or
        tensorscatter, standard opset-24 TensorScatter + Attention, which TensorRT 10.15+
        runs in place.  auto: tensorscatter when this build makes engines, else gqa."""
        if self.resolved_kv_cache == "concat":
            return None
        if self.cache_op != "auto":
            return self.cache_op
        if self.backend == "trt":
            return "tensorscatter"
        if self.backend == "auto":
            from avg_edge.runtime.backends.trt_backend import usable

            return "tensorscatter" if usable() else "gqa"
        return "gqa"

    @property
    def resolved_kv_cache(self) -> str:
        """auto: in place (ONNX Runtime's GroupQueryAttention, the cache never copied) for
        builds that ONNX Runtime runs; concat for builds that TensorRT may run (engines
        requested or possible here) and for quantized builds, whose graphs are meant for
        TensorRT too: TensorRT cannot parse ONNX Runtime's contrib op."""
        if self.kv_cache != "auto":
            return self.kv_cache
        if self.precision_info.quantizer is not None or self.backend == "trt":
            return "concat"
        if self.backend == "auto":
            from avg_edge.runtime.backends.trt_backend import usable

            return "concat" if usable() else "inplace"
        return "inplace"


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
    if o.kv_cache not in ("auto", *S.KV_CACHES):
        raise UsageError(f"--kv-cache: expected auto, concat or inplace, got {o.kv_cache!r}")
    if o.cache_op not in ("auto", *S.CACHE_OPS):
        raise UsageError(f"--cache-op: expected auto, {' or '.join(S.CACHE_OPS)}, got {o.cache_op!r}")
    if o.cache_op != "auto" and o.resolved_kv_cache == "concat":
        raise UsageError(f"--cache-op {o.cache_op}: it chooses the in-place cache's operators, and this build's cache is "
                         f"concat ({'--kv-cache concat' if o.kv_cache == 'concat' else 'chosen by --kv-cache auto'}); "
                         "add --kv-cache inplace")
    if o.resolved_cache_op in S.CACHE_OP_OPSET:
        need = S.CACHE_OP_OPSET[o.resolved_cache_op]
        if p.quantizer is not None:
            raise UsageError(f"--cache-op {o.resolved_cache_op} needs opset {need}, and {o.precision} builds use opsets "
                             f"{p.opsets.start}..{p.opsets.stop - 1}; use --cache-op gqa or --kv-cache concat")
        if o.opset is not None and o.opset != need:
            raise UsageError(f"--opset {o.opset}: --cache-op {o.resolved_cache_op} builds use opset {need} "
                             "(TensorScatter and Attention); drop --opset")
    else:
        p.opset(o.opset)
    if o.max_batch is not None and (isinstance(o.max_batch, bool) or not isinstance(o.max_batch, int)
                                    or not 1 <= o.max_batch <= MAX_BATCH_LIMIT):
        raise UsageError(f"--max-batch: expected 1..{MAX_BATCH_LIMIT} requests per decode step, got {o.max_batch!r}")
    if o.max_batch is not None and o.max_batch > 1 and o.resolved_kv_cache == "concat":
        raise UsageError(f"--max-batch {o.max_batch}: only the in-place KV cache batches requests, and this build's is "
                         f"concat ({'--kv-cache concat' if o.kv_cache == 'concat' else 'chosen by --kv-cache auto'}); "
                         "add --kv-cache inplace (ONNX Runtime only), or drop --max-batch")
    if o.resolved_cache_op == "gqa" and o.backend == "trt":
        raise UsageError("--cache-op gqa uses ONNX Runtime's GroupQueryAttention, which TensorRT cannot parse; "
                         "use --cache-op tensorscatter (TensorRT 10.15+) or --kv-cache concat for engines")
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


def auto_max_batch(cache_bytes_per_request: int) -> int:
    """The default --max-batch: as many requests as fit BATCH_CACHE_BUDGET of whole-context
    KV cache, at most C.DEFAULT_MAX_BATCH, at least 1."""
    return max(1, min(C.DEFAULT_MAX_BATCH, BATCH_CACHE_BUDGET // max(cache_bytes_per_request, 1)))


def cache_bytes(config, max_context: int | None, precision_name: str) -> int:
    """One request's whole-context KV cache: layers x (key, value) x KV heads x context x head dim."""
    t = config.text
    itemsize = np.dtype(precision(precision_name).float_dtype).itemsize
    return t.num_hidden_layers * 2 * t.num_key_value_heads * (max_context or t.max_position_embeddings) * t.head_dim * itemsize


def bounds_for(config, max_crops: int | None, max_context: int | None, max_batch: int = C.DEFAULT_MAX_BATCH) -> S.Bounds:
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
                    min_visual=config.granularities[0], max_visual=max_visual, max_batch=max_batch)


def graph_specs(config, b: S.Bounds, precision_name: str, kv_cache: str = "concat") -> dict[str, S.GraphSpec]:
    dt = precision(precision_name).float_dtype           # quantized graphs keep fp32 I/O
    t = config.text
    out = {S.VISION: S.vision_spec(t.hidden_size, config.granularities, b, config.crop_size, dt)}
    if config.has_router:
        out[S.ROUTER] = S.router_spec(t.hidden_size, config.granularities, b, dt)
    out[S.DECODER] = S.decoder_spec(t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.vocab_size,
                                    b, dt, kv_cache)
    return out


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"avg_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build(o: BuildOptions, progress: Callable[[str], None] = print, phases: Phases | None = None) -> BuildResult:
    """An fp32 or fp16 build (int8/int4: calibration.quantized_build.build_quantized).

    Memory: each graph is exported, and its reference outputs computed, in a process of
    its own that loads only that graph's weights straight into the build's dtype (large
    weights go to external data); ONNX Runtime then checks each graph against the
    stored references with no PyTorch model in memory.  Each phase's line shows the peak
    resident memory of the build's processes (also kept in the manifest)."""
    from avg_edge.export.graph_job import TABLE_WEIGHTS, GraphJob, run_in_child
    from avg_edge.export.tokenizer_json import write_tokenizer_json
    from avg_edge.model import load_model
    from avg_edge.model.config import AvgLlavaConfig

    check_options(o)
    p = o.precision_info
    if p.quantizer is not None:
        raise UsageError(f"--precision {o.precision}: use avg_edge.calibration.quantized_build.build_quantized")
    opset = o.resolved_opset
    start = time.perf_counter()
    out = Path(o.output)
    ph = phases if phases is not None else Phases(progress)
    config = AvgLlavaConfig.from_folder(o.model)
    b = bounds_for(config, o.max_crops, o.max_context, o.resolved_max_batch(cache_bytes(config, o.max_context, o.precision)))
    kv_cache = o.resolved_kv_cache
    specs = graph_specs(config, b, o.precision, kv_cache)
    ph.total = ph.count + 2 + len(specs) * (2 if o.validate else 1) + 2
    heads = config.text.num_attention_heads
    points = {n: V.validation_points(s, heads if n == S.DECODER else None) for n, s in specs.items()}
    with BuildCommit(out) as commit:
        tmp = commit.folder
        with ph.phase("tokenizer.json") as detail:
            detail.text = write_tokenizer_json(Path(o.model), tmp / C.TOKENIZER_JSON_FILE)
        with ph.phase("tables") as detail:
            tables = load_model(o.model, dtype=TORCH_DTYPES[p.float_dtype], only=TABLE_WEIGHTS)
            write_tables(tables, tmp, TORCH_DTYPES[p.float_dtype])
            del tables
            release_memory()
            detail.text = f"{C.EMBED_TABLE_FILE} and {C.IMAGE_NEWLINE_FILE} ({p.float_dtype})"

        refs: dict[str, np.ndarray] = {}
        wrapper_diff = None
        for name, spec in specs.items():
            what = f"export {spec.file}" + (f" and its reference outputs (PyTorch, {len(points[name])} points)"
                                             if o.validate else "")
            with ph.phase(what) as detail:
                job = GraphJob(str(o.model), name, spec.to_dict(), str(tmp), opset, p.float_dtype,
                               [asdict(pt) for pt in points[name]] if o.validate else [],
                               o.resolved_cache_op or "gqa")
                result = run_in_child(job)
                ph.child_peak(result.peak_rss_bytes)
                if o.validate:
                    refs.update(V.load_references(job.references_file))
                    job.references_file.unlink()
                    wrapper_diff = result.wrapper_diff if result.wrapper_diff is not None else wrapper_diff
                detail.text = (f"({o.precision}, opset {opset}, {result.graph_bytes / GIB:.2f} GiB"
                           + (f", {kv_cache} KV cache{f' ({o.resolved_cache_op})' if o.resolved_cache_op else ''})"
                              if name == S.DECODER else ")"))
        if o.validate:
            V.save_references(tmp / C.REFERENCE_FILE, refs)

        validation: dict[str, V.GraphValidation] = {}
        for name, spec in specs.items():
            if not o.validate:
                continue
            with ph.phase(f"validate {spec.file} against PyTorch") as detail:
                with OrtBackend(spec, tmp / spec.file, providers="cpu") as backend:
                    v = V.check(spec, points[name], refs, lambda feeds: backend.infer(feeds, check=False), p.tolerance,
                                backend.describe())
                    row_check = V.check_rows(spec, points[name], lambda feeds: backend.infer(feeds, check=False),
                                        p.tolerance, backend.describe()) if name == S.DECODER else None
                validation[name] = v
                release_memory()
                detail.text = f"{v.status}, max abs diff {v.max_abs_diff:.2e} over {len(v.points)} points"
                if row_check is not None and row_check.points:     # a batched step against its requests run alone
                    validation[f"{name}.rows"] = row_check
                    detail.text += (f"; batched rows vs each alone: {row_check.status}, "
                                    f"max abs diff {row_check.max_abs_diff:.2e}")
        if wrapper_diff is not None:
            progress(f"      decoder code vs transformers' Llama: max abs diff {wrapper_diff:.2e}")
        failed = [n for n, v in validation.items() if v.status == "failed"]
        if wrapper_diff is not None and wrapper_diff > 1e-3:
            failed.append("decoder(code)")

        notes: list[str] = []
        with ph.phase("TensorRT") as detail:
            engines, trt_info = build_engines(o, specs, tmp, notes) if not failed else ({}, None)
            if engines and o.validate:
                engine_checks = validate_engines(specs, tmp, engines, trt_info, points, refs, p)
                validation.update(engine_checks)
                failed += [n for n, v in engine_checks.items() if v.status == "failed"]
            detail.text = "built " + ", ".join(engines.values()) if engines else notes[-1] if notes else "skipped"

        manifest = Manifest(
            format_version=C.MANIFEST_FORMAT, precision=o.precision, opset=opset,
            granularities=list(config.granularities), pinpoints=[list(p) for p in config.pinpoints],
            crop_size=config.crop_size, image_mean=list(config.image_mean), image_std=list(config.image_std),
            chat_template=DEFAULT_TEMPLATE.to_dict(),
            bos_token_id=config.text.bos_token_id, eos_token_id=config.text.eos_token_id,
            context_length=b.max_context, hidden_size=config.hidden_size, has_router=config.has_router,
            kv_cache=kv_cache, cache_op=o.resolved_cache_op, graphs={n: s.to_dict() for n, s in specs.items()},
            validation={n: v.to_dict() for n, v in validation.items()} | (
                {"decoder_code_vs_transformers": wrapper_diff} if wrapper_diff is not None else {}),
            tools=tool_versions(), source={"model": str(Path(o.model).resolve()), "layout": config.source_layout},
            tensorrt=trt_info, engines=engines,
            router={"text_file": C.ROUTER_TEXT_FILE, "text_candidates": config.filtered_text_num,
                    "text_from": config.router_text_candidates,
                    "alignment": {"loss": "rglf", "token_cost": config.router_token_cost, "by": "training"}}
            if config.has_router else None,
        )
        rows = [GraphRow(n, o.precision, graph_bytes(tmp, s.file), validation[n].max_abs_diff if n in validation else None,
                         validation[n].status if n in validation else "not run", n in engines) for n, s in specs.items()]
        if failed:
            raise BuildError(f"validation failed for {failed}: outputs differ from PyTorch beyond tolerance; "
                             f"the previous build at {out} is untouched (use --no-validate to keep such a build)")
        with ph.phase(f"write {out}"):
            manifest.phases = ph.to_list()
            commit.finish(manifest)
        manifest.phases = ph.to_list()
        return BuildResult(out, manifest, rows, time.perf_counter() - start, notes)


def write_tables(model, folder: Path, dtype: torch.dtype) -> None:
    """The embedding table and the image-newline vector, read by the runtime with mmap."""
    table = model.language_model.get_input_embeddings().weight.detach().to(dtype).numpy()
    np.save(folder / C.EMBED_TABLE_FILE, table, allow_pickle=False)
    np.save(folder / C.IMAGE_NEWLINE_FILE, model.image_newline.detach().to(dtype).numpy(), allow_pickle=False)


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


def validate_engines(specs: dict[str, S.GraphSpec], folder: Path, engines: dict[str, str], trt_info: dict,
                     points: dict[str, list[V.Point]], refs: dict[str, np.ndarray], p: Precision):
    """TensorRT engines against the stored references, at the same points as ONNX Runtime."""
    from avg_edge.runtime.backends.trt_backend import TrtBackend

    out = {}
    for name, engine in engines.items():
        with TrtBackend(specs[name], folder / engine, trt_info) as backend:
            out[f"{name}.engine"] = V.check(specs[name], points[name], refs, lambda f: backend.infer(f, check=False),
                                            p.tolerance, backend.describe())
    return out
