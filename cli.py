"""Command-line front ends (thin: parse, call the library, print).

`avg-export build|realign` needs the `export` extra, `avg-serve` the `serve` extra.
Every error prints one line to stderr, no traceback, and exits with its category's code
from avg_edge.errors.CATEGORIES (0 ok, 1 the job failed, 2 usage error, 130 interrupted).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from avg_edge import constants as C
from avg_edge.errors import MissingExtra, UsageError, category_of, one_line

DEFAULT_BUILD_DIR = Path("builds/avg-edge-demo")

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

export_app = typer.Typer(name="avg-export", help="Export AVG-LLaVA to ONNX (and TensorRT engines where possible).",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _exits(fn):
    """Every error: one line on stderr and its category's exit code."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            raise typer.Exit(1)   # stdout closed by the reader (e.g. | head): nothing to say
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - ours by category, anyone else's as internal
            category = category_of(e)
            err.print(f"error: {one_line(e)}", markup=False)
            if category.name == "internal" and os.environ.get("AVG_EDGE_TRACEBACK"):
                raise
            raise typer.Exit(category.exit_code)

    return wrapper


def require(module: str, extra: str, what: str) -> None:
    """A usage error naming the extra when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(what, extra, module)


def check_range(option: str, value: float | None, low: float, high: float | None = None, *,
                above: bool = False, kind: str = "an integer") -> None:
    """A usage error unless `value` (None: not given) is finite and >= low (> low with
    `above`) and <= high."""
    if value is None:
        return
    if not math.isfinite(value) or (value <= low if above else value < low) or (high is not None and value > high):
        bounds = f"> {low:g}" if above else f">= {low:g}" if high is None else f"{low:g}..{high:g}"
        raise UsageError(f"{option}: expected {kind} {bounds}, got {value}")


def check_listen(host: str, port: int) -> None:
    """A usage error now, rather than uvicorn's log line and exit 3 later, when the
    address cannot be bound (in use, not this machine's, not an address)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host: expected an address of this machine (e.g. 127.0.0.1), got {host!r} ({e})") from e
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)        # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                             "choose another --port or stop what listens there") from e


def demo_checkpoint() -> Path:
    from avg_edge.model.demo import CHECKPOINT

    return CHECKPOINT


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@export_app.command("build")
@_exits
def build_cmd(
    model: Optional[Path] = typer.Option(None, "-m", "--model", help="Checkpoint folder (default: the bundled demo model)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help=f"Build folder (default: {DEFAULT_BUILD_DIR} for the demo, builds/<model>-<precision> otherwise)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, int8 or int4 (see README: precisions)."),
    backend: str = typer.Option("auto", "--backend", help="auto: engines when TensorRT and a GPU exist; ort: ONNX only; trt: engines or fail."),
    max_crops: Optional[int] = typer.Option(None, "--max-crops", help="Most crops per image the build accepts (default: the pinpoints' most)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Decoder context (default: the model's)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the precision's; TensorRT 10.3 parses 9..20)."),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="inplace: the decoder writes into one cache buffer; concat: it returns past + new (TensorRT 10.3+ too); auto: inplace unless TensorRT engines are built or the build is quantized."),
    cache_op: str = typer.Option("auto", "--cache-op", help="The in-place cache's operators: gqa (ONNX Runtime's GroupQueryAttention, fastest there, ONNX Runtime only) or tensorscatter (standard opset-24 TensorScatter + Attention, which TensorRT 10.15+ runs in place; not JetPack 6.2's 10.3); auto: tensorscatter when engines are built here, else gqa."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help=f"Most requests one decode step takes (avg-serve --parallel); in-place KV cache only. Default: up to {C.DEFAULT_MAX_BATCH} while the batch's whole-context KV cache stays within 1 GiB (a 7B fp16 build at 4096 tokens: 1), as validation holds several copies of it; concat: 1."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the check against PyTorch."),
    force: bool = typer.Option(False, "--force", help="Replace an existing build folder."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help="int8/int4: .jsonl or folder of image+question pairs (default: the demo's calib split)."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="int8/int4: calibration samples to run."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="int8/int4: .jsonl with answers for the drift report (default: the demo's test split)."),
    eval_samples: int = typer.Option(120, "--eval-samples", help="int8/int4: evaluation samples."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="int8/int4: fail past this accuracy drop (points)."),
    accept_drift: bool = typer.Option(False, "--accept-drift", help="int8/int4: keep the build even past --max-accuracy-drop."),
    int4_block: int = typer.Option(32, "--int4-block-size", help="int4: weights per scale."),
) -> None:
    """Export the vision+scaler, router and decoder graphs, validate them, build engines."""
    from avg_edge.precision import precision as precision_info

    check_range("--calib-samples", calib_samples, 1)
    check_range("--eval-samples", eval_samples, 1)
    if not math.isfinite(max_accuracy_drop):      # negative is fine: it asks for a gain
        raise UsageError(f"--max-accuracy-drop: expected a finite number of points, got {max_accuracy_drop}")
    check_range("--int4-block-size", int4_block, 1)

    p = precision_info(precision)
    require("torch", "export", "avg-export build")
    from avg_edge.export.exporter import BuildOptions, build

    if model is None:
        model = demo_checkpoint()
        if not (model / "config.json").is_file():
            raise UsageError(f"no -m given and the bundled demo model is missing at {model}")
        output = output or DEFAULT_BUILD_DIR
    output = output or Path("builds") / f"{model.resolve().name}-{precision}"
    opts = BuildOptions(model=model, output=output, precision=precision, backend=backend, max_crops=max_crops,
                        max_context=max_context, opset=opset, validate=not no_validate, force=force, kv_cache=kv_cache,
                        max_batch=max_batch, cache_op=cache_op)
    say = lambda line: err.print(line, markup=False)  # noqa: E731
    if p.quantizer is not None:
        from avg_edge.calibration.quantized_build import QuantOptions, build_quantized

        q = QuantOptions(calib_data=calib_data, calib_samples=calib_samples, eval_data=eval_data, eval_samples=eval_samples,
                         max_accuracy_drop=max_accuracy_drop, accept_drift=accept_drift, block_size=int4_block)
        result = build_quantized(opts, q, progress=say)
    else:
        result = build(opts, progress=say)
    table = Table(title=f"{result.output}  ({result.seconds:.1f} s)")
    for col in ("graph", "precision", "size", "max diff", "validation", "engine"):
        table.add_column(col)
    for r in result.rows:
        diff = "-" if r.max_abs_diff is None or r.max_abs_diff != r.max_abs_diff else f"{r.max_abs_diff:.1e}"
        table.add_row(r.graph, r.precision, _human(r.bytes), diff, r.validation, "yes" if r.engine else "no")
    out.print(table)


@export_app.command("realign")
@_exits
def realign_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder (typically int8/int4)."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help=".jsonl with answers (default: the demo's calib split)."),
    calib_samples: int = typer.Option(96, "--calib-samples"),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help=".jsonl with answers (default: the demo's test split)."),
    eval_samples: int = typer.Option(120, "--eval-samples"),
    epochs: int = typer.Option(4, "--epochs"),
    lr: float = typer.Option(3e-4, "--lr"),
    token_cost: float = typer.Option(0.0, "--token-cost",
                                     help="Cost-aware RGLF: rank granularities by answer NLL + COST x g / 576 "
                                          "(nats per answer token for the finest granularity's visual tokens); "
                                          "0 is the paper's RGLF. Recorded in the manifest."),
) -> None:
    """Retrain only the router against the build's own decoder (RGLF) and re-export router.onnx."""
    check_range("--calib-samples", calib_samples, 1)
    check_range("--eval-samples", eval_samples, 1)
    check_range("--epochs", epochs, 1)
    check_range("--lr", lr, 0, above=True, kind="a number")
    check_range("--token-cost", token_cost, 0, kind="a number")
    require("torch", "export", "avg-export realign")
    from avg_edge.calibration.realign import RealignOptions, realign

    if not build_dir.is_dir():
        raise UsageError(f"build folder not found: {build_dir}")
    realign(build_dir, RealignOptions(calib_data, calib_samples, eval_data, eval_samples, epochs, lr,
                                      token_cost=token_cost),
            progress=lambda line: err.print(line, markup=False))


@export_app.command("engines")
@_exits
def engines_cmd(
    build_dir: Path = typer.Argument(..., help="An ONNX build folder made by avg-export build (copied to this device)."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines the folder already has."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="TensorRT timing cache (default: one per TensorRT version and GPU under ~/.cache/avg-edge)."),
    workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="TensorRT builder workspace."),
) -> None:
    """Build TensorRT engines for an existing build folder on this machine (no torch needed)
    and check them against the references the export stored."""
    from avg_edge.runtime.engines import build_engines_for_folder

    if not build_dir.is_dir():
        raise UsageError(f"build folder not found: {build_dir}")
    check_range("--workspace-gb", workspace_gb, 0, above=True, kind="a number")
    m = build_engines_for_folder(build_dir, force=force, timing_cache=timing_cache,
                                 workspace_bytes=int(workspace_gb * 1024**3),
                                 progress=lambda line: err.print(line, markup=False))
    out.print(f"{build_dir}: engines {m.engines} for TensorRT {m.tensorrt['version']} on {m.tensorrt['gpu']}")


@export_app.command("triton")
@_exits
def triton_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder."),
    out: Path = typer.Argument(..., help="The model repository to write (tritonserver --model-repository OUT)."),
    backend: str = typer.Option("python", "--backend",
                                help="How vision and router run: python (ONNX Runtime inside Triton's Python backend; "
                                     "any machine), onnxruntime (Triton's ONNX Runtime backend, the .onnx files) or "
                                     "tensorrt (the build's engines; build them on the target GPU first)."),
    instances: int = typer.Option(1, "--instances", help="Instances of the vision and router models."),
    orchestrators: int = typer.Option(1, "--orchestrators",
                                      help="Instances of the avg_edge model: requests answered at the same time."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime threads per Python-backend instance (0: default)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a Triton Inference Server model repository for a build (vision, router, and a
    streaming avg_edge orchestrator)."""
    from avg_edge.export.triton import TritonOptions, write_repository

    check_range("--instances", instances, 1)
    check_range("--orchestrators", orchestrators, 1)
    check_range("--threads", threads, 0)
    if not build_dir.is_dir():
        raise UsageError(f"build folder not found: {build_dir}")
    models = write_repository(build_dir, out, TritonOptions(backend, instances, orchestrators, threads, force))
    err.print(f"wrote {out}: models {', '.join(models)}; serve it with tritonserver --model-repository {out}",
              markup=False)


@export_app.command("inspect")
@_exits
def inspect_cmd(build_dir: Path = typer.Argument(..., help="A build folder."),
                verify: bool = typer.Option(False, "--verify", help="Check every file's sha256.")) -> None:
    """Print the manifest and each graph's I/O table."""
    from avg_edge.manifest import load_manifest

    m = load_manifest(build_dir, verify=verify)
    out.print(f"build {build_dir}: format {m.format_version}, {m.precision}, opset {m.opset}, "
              f"context {m.context_length}, router: {'yes' if m.has_router else 'no'}")
    from avg_edge.specs import DecoderRoles

    batch = DecoderRoles(m.spec("decoder")).max_batch if "decoder" in m.graphs else 1
    out.print(f"granularities {m.granularities}; crop {m.crop_size}; pinpoints {m.pinpoints}; KV cache {m.kv_cache}{f' ({m.in_place_op})' if m.in_place_op else ''}; "
              f"decode batch up to {batch}")
    out.print(f"tokens: bos {m.bos_token_id}, eos {m.eos_token_id}; chat template {m.chat_template.get('name')}")
    for name in m.graphs:
        spec = m.spec(name)
        v = m.validation.get(name, {})
        status = v.get("status", "not run")
        diff = v.get("max_abs_diff")
        table = Table(title=f"{spec.file}  validation: {status}" + (f", max abs diff {diff:.1e}" if isinstance(diff, float) else ""))
        for col in ("", "name", "dtype", "shape"):
            table.add_column(col)
        for row in spec.io_table():
            table.add_row(*row)
        out.print(table)
        for p in spec.profiles:
            axes = ", ".join(f"{a.name} {a.min}/{a.opt}/{a.max}" for a in p.axes.values())
            out.print(f"  profile {p.name}: {axes}")
    out.print("files: " + ", ".join(f"{n} ({_human(i['bytes'])})" for n, i in m.files.items()))
    if m.quantization:
        out.print("quantization: " + "; ".join(f"{g}: {d['method']}" for g, d in m.quantization["graphs"].items()))
    if m.drift:
        from avg_edge.calibration.drift import DriftReport

        for line in DriftReport(**m.drift).summary_lines():
            out.print("  drift: " + line)
    if m.tensorrt:
        out.print(f"TensorRT {m.tensorrt['version']} on {m.tensorrt['gpu']} (sm {m.tensorrt['compute_capability']}): {m.engines}")
    else:
        out.print("TensorRT engines: none")
    out.print("tools: " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))


run_app = typer.Typer(name="avg-run", add_completion=False, pretty_exceptions_enable=False,
                      help="Answer a question about an image with a build folder (no torch needed).")


@run_app.command()
@_exits
def run_cmd(
    image: str = typer.Argument(..., help="Image file (PNG, JPEG, WebP, GIF, BMP, TIFF), or - for standard input."),
    question: Optional[str] = typer.Argument(None, help="The question; without one, questions are read from standard input, one per line, as a conversation about the image (like ollama run; /bye or end of input stops)."),
    model: Path = typer.Option(DEFAULT_BUILD_DIR, "-m", "--model", help="Build folder made by avg-export build."),
    granularity: str = typer.Option("auto", "--granularity", "-g",
                                    help="auto (the router chooses) or one of the build's granularities, in visual "
                                         "tokens per crop (avg-export inspect lists them; AVG-LLaVA: 36 72 144 288 576)."),
    max_visual_tokens: Optional[int] = typer.Option(
        None, "--max-visual-tokens", help="A budget of visual tokens for the image: the router's best granularity "
                                          "among those that fit (exit 1 when none fits)."),
    backend: str = typer.Option("auto", "--backend", help="auto (TensorRT engines if usable, else ONNX Runtime), ort or trt."),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Timing summary on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    verify: bool = typer.Option(False, "--verify", help="Check every build file's sha256 first."),
) -> None:
    """Stream the answer to stdout; exit 0 ok, 1 runtime error, 2 usage error."""
    from avg_edge.runtime.backends import check_backend
    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.sampling import SamplingParams

    if image != "-" and not Path(image).exists():
        raise UsageError(f"image file not found: {image}")
    if question is None and image == "-":
        raise UsageError("avg-run - without a question: standard input cannot carry both the image and the questions; "
                         "pass an image file, or the question as an argument")
    if question is not None and not question.strip():
        raise UsageError("question: expected some text, got an empty question")
    check_backend(backend, "--backend")
    SamplingParams(temp, top_k, top_p, seed)
    if max_tokens < 1:
        raise UsageError(f"--max-tokens: expected a positive integer, got {max_tokens}")
    if max_visual_tokens is not None and max_visual_tokens < 1:
        raise UsageError(f"--max-visual-tokens: expected a positive integer, got {max_visual_tokens}")
    if not model.is_dir():
        hint = "make it with: make demo (or avg-export build)" if model == DEFAULT_BUILD_DIR else "pass -m BUILD_DIR"
        raise UsageError(f"build folder not found: {model} ({hint})")
    source = sys.stdin.buffer.read() if image == "-" else image
    settings = dict(max_new_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
                    max_visual_tokens=max_visual_tokens)
    with Pipeline.load(model, backend=backend, verify=verify) as pipe:
        gran = _granularity_option(granularity, pipe.granularities)
        if question is None:
            _chat(pipe, source, gran, settings, verbose, as_json)
            return
        on_text = None if as_json else _say
        result = pipe.generate(source, question, granularity=gran, on_text=on_text, **settings)
        _answer(pipe, result, verbose, as_json)


def _say(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _answer(pipe, result, verbose: bool, as_json: bool) -> None:
    import json

    if as_json:
        d = {"answer": result.text, **result.to_dict(), "backend": pipe.describe_backend()}
        del d["text"]
        sys.stdout.write(json.dumps(d) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        err.print(timing_summary(result, pipe.granularities, pipe.describe_backend()), markup=False)


def _chat(pipe, source, gran, settings: dict, verbose: bool, as_json: bool) -> None:
    """avg-run IMAGE without a question: a conversation about the image, one question per
    line of standard input.  The image goes through the vision graph once; each answer
    joins the history the next question is asked after.  A question that fails (say, the
    conversation outgrew the context) prints its error and the conversation goes on."""
    from avg_edge.errors import AvgEdgeError

    image = pipe.encode_image(source)
    history: list[str] = []
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            err.print(">>> ", end="", markup=False)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/bye", "/exit"):
            break
        question = line.strip()
        if not question:
            continue
        try:
            result = pipe.generate(image, question, granularity=gran, on_text=None if as_json else _say,
                                   history=history, **settings)
        except AvgEdgeError as e:
            err.print(f"error: {one_line(e)}", markup=False)
            continue
        _answer(pipe, result, verbose, as_json)
        if result.text:
            history += [question, result.text]


def _granularity_option(value: str, granularities: list[int]) -> int | None:
    """-g: auto or one of the build's granularities (from its manifest)."""
    if value == "auto":
        return None
    if value.strip().isdigit() and int(value) in granularities:
        return int(value)
    raise UsageError(f"--granularity: expected auto or one of this build's granularities "
                     f"{', '.join(map(str, granularities))}; got {value!r}")


def timing_summary(r, granularities: list[int], backend: str) -> str:
    t = r.timings
    ms = lambda s: f"{s * 1000:10.2f} ms"  # noqa: E731
    share = 100.0 * r.visual_tokens / r.visual_tokens_full if r.visual_tokens_full else 100.0
    chosen = (f"granularity {r.granularity} (router p={r.router_probs[granularities.index(r.granularity)]:.2f})"
              if r.router_probs else f"granularity {r.granularity} (fixed)")
    lines = [
        f"backend:              {backend}",
        f"load time:            {ms(t.load)}",
        f"image preprocess:     {ms(t.preprocess)}",
        f"vision:               {ms(t.vision)}",
        f"router:               {ms(t.router)}  -> {chosen}",
        f"visual tokens:        {r.visual_tokens:10d}    vs {r.visual_tokens_full} at {granularities[-1]} ({share:.1f}%)",
        f"prompt eval count:    {t.prompt_eval_count:10d} token(s)",
        f"prompt eval duration: {ms(t.prompt_eval)}  ({t.prompt_eval_rate:.2f} tokens/s)",
        f"eval count:           {t.eval_count:10d} token(s)",
        f"eval duration:        {ms(t.eval)}  " + (f"({t.eval_rate:.2f} tokens/s)" if t.eval_count > 1 else
                                                    "(no decode step: the first token comes from the prompt eval)"),
        f"time to first token:  {ms(t.time_to_first_token)}",
        f"total duration:       {ms(t.total)}  ({100 * t.overhead_share:.1f}% outside backend calls)",
    ]
    return "\n".join(lines)


serve_app = typer.Typer(name="avg-serve", add_completion=False, pretty_exceptions_enable=False,
                        help="OpenAI-compatible HTTP server for a build folder.")


@serve_app.command()
@_exits
def serve_cmd(
    model: Path = typer.Option(DEFAULT_BUILD_DIR, "-m", "--model", help="Build folder made by avg-export build."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port"),
    backend: str = typer.Option("auto", "--backend", help="auto, ort or trt."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests in flight (decoding or waiting) before answering 503 [default: 4, or 2 x --parallel if larger]."),
    max_request_mb: float = typer.Option(20.0, "--max-request-mb", help="Largest request body."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
    parallel: int = typer.Option(1, "--parallel", "-np", help="Decode slots: requests decoded together in one batched decoder call (needs a build whose decoder batches, the in-place cache)."),
    image_cache: int = typer.Option(4, "--image-cache", help="Images whose vision features are kept for follow-up questions (0: none)."),
    fetch_timeout: float = typer.Option(10.0, "--fetch-timeout", help="Seconds allowed for fetching a remote image (--allow-remote-images)."),
    threads: int = typer.Option(0, "--threads", "-t", help="ONNX Runtime threads per graph (0: its default, one per core). HTTP, tokenizing and sampling run on other threads of this process; with a small model on few cores, fewer ONNX Runtime threads leave them a core."),
) -> None:
    """Serve POST /v1/chat/completions, GET /v1/models and GET /health."""
    require("uvicorn", "serve", "avg-serve")
    require("starlette", "serve", "avg-serve")
    import uvicorn

    from avg_edge.runtime.pipeline import Pipeline
    from avg_edge.runtime.server import ServerOptions, create_app

    check_range("--port", port, 1, 65535)
    check_range("--max-queue", max_queue, 1)
    check_range("--max-request-mb", max_request_mb, 0, above=True, kind="a number of megabytes")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key: expected a key, got an empty string (leave --api-key out for no key)")
    if not model.is_dir():
        raise UsageError(f"build folder not found: {model} (make one with avg-export build)")
    check_range("--parallel", parallel, 1)
    check_range("--image-cache", image_cache, 0)
    check_range("--fetch-timeout", fetch_timeout, 0, 600, above=True, kind="seconds")
    check_range("--threads", threads, 0, 1024)
    max_queue = max(4, 2 * parallel) if max_queue is None else max_queue
    if max_queue < parallel:
        raise UsageError(f"--max-queue: expected at least --parallel ({parallel}) requests, got {max_queue}")
    check_listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}, not loopback" + ("" if api_key else " and without --api-key"), markup=False)
    pipe = Pipeline.load(model, backend=backend, threads=threads)
    opts = ServerOptions(model_id=model.resolve().name, api_key=api_key, max_queue=max_queue,
                         max_request_bytes=int(max_request_mb * 1024**2), allow_remote_images=allow_remote_images,
                         parallel=parallel, image_cache=image_cache, fetch_timeout=fetch_timeout)
    import logging

    logging.basicConfig(level=logging.INFO, format="avg-serve: %(message)s")   # a disconnect is one line
    err.print(f"avg-serve: {opts.model_id} on http://{host}:{port} ({pipe.describe_backend()}, "
              f"{parallel} decode slot{'s' if parallel > 1 else ''})", markup=False)
    uvicorn.run(create_app(pipe, opts), host=host, port=port, log_level="warning")


def export_main() -> None:
    export_app()


def run_main() -> None:
    run_app()


def serve_main() -> None:
    serve_app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_app())
