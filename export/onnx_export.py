"""Export one graph to ONNX with torch's dynamo exporter, driven by its spec."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avg_edge.errors import BuildError
from avg_edge.export.graphs import custom_translations
from avg_edge.specs import DERIVED_AXES, GraphSpec, example_sizes, make_feeds


class ExportFailed(BuildError):
    """torch's exporter could not turn a graph into ONNX."""

# Weights beyond this go to an external-data file beside the .onnx: protobuf caps a file
# at 2 GiB, and an inline model is serialised in memory (the exporter then holds the
# weights about three times over; written as external data they are streamed to disk).
EXTERNAL_DATA_BYTES = 256 * 1024**2


def _structure(module: nn.Module, items: list):
    """Group flat per-input items the way forward() takes them (*args become one tuple)."""
    params = list(inspect.signature(module.forward).parameters.values())
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return tuple(items[: len(fixed)]) + (tuple(items[len(fixed):]),)
    return tuple(items)


def dynamic_shapes(module: nn.Module, spec: GraphSpec):
    axes = spec.axes()
    dims = {n: torch.export.Dim(n, min=a.min, max=a.max) for n, a in axes.items() if n not in DERIVED_AXES}
    per_input = []
    for t in spec.inputs:
        per_input.append({i: (torch.export.Dim.AUTO if d in DERIVED_AXES else dims[d])
                          for i, d in enumerate(t.shape) if isinstance(d, str)})
    return _structure(module, per_input)


def torch_inputs(feeds: dict[str, np.ndarray], spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    """Flat positional tensors in the spec's input order."""
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs)


def _name_dims(path: Path, spec: GraphSpec) -> None:
    """Give every dynamic dim in the file the spec's axis name (the exporter invents some)."""
    model = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        t = by_name.get(vi.name)
        if t is None:
            raise RuntimeError(f"{path.name}: the exporter produced '{vi.name}', not in the spec {list(by_name)}")
        for dim, want in zip(vi.type.tensor_type.shape.dim, t.shape):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want
    onnx.save(model, str(path))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warns about optional ops (torchvision); keep that
    out of the build's output but available for the failure log."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as chatter:
            warnings.simplefilter("ignore")
            yield chatter
    finally:
        logger.setLevel(level)


class _MatMulLinear(nn.Module):
    """nn.Linear as x @ weight_t with the weight stored transposed ([in, out], as ONNX's
    MatMul reads it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def transpose_linear_weights(module: nn.Module) -> None:
    """Replace every nn.Linear in `module` (in place, one at a time) by its _MatMulLinear
    twin.  The exporter writes x @ W.T as a Transpose of W that its optimiser folds into a
    new constant, while the module still holds W: twice the weights in memory (25 GiB for
    7B's fp16 decoder).  Transposed here one matrix at a time, the export holds them once.
    The maths is unchanged.  Linears inside nn.MultiheadAttention stay (its forward reads
    out_proj.weight itself)."""
    # (parent, name) pairs only: a list holding the Linear modules themselves would keep
    # every original weight alive until the end.
    slots = [(parent, name) for parent in module.modules() if not isinstance(parent, nn.MultiheadAttention)
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in slots:
        setattr(parent, name, _MatMulLinear(getattr(parent, name)))


def export_graph(module: nn.Module, spec: GraphSpec, out_dir: Path, opset: int, cache_op: str = "gqa") -> Path:
    """Write `spec.file` into out_dir (with `<file>.data` for large weights) and check it.
    `cache_op` picks the in-place cache's operators (graphs.TRANSLATIONS).
    The module's nn.Linear layers are replaced by transposed twins first (same maths,
    see transpose_linear_weights)."""
    module.eval()
    transpose_linear_weights(module)
    feeds = make_feeds(spec, example_sizes(spec), np.random.default_rng(0), zeros=True)
    args = torch_inputs(feeds, spec)
    path = out_dir / spec.file
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with torch.no_grad(), _quiet_exporter() as chatter:
            torch.onnx.export(
                module, args, str(path), dynamo=True, opset_version=opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes(module, spec),
                external_data=weight_bytes > EXTERNAL_DATA_BYTES, optimize=True, verbose=False,
                custom_translation_table=custom_translations(cache_op),
            )
    except Exception as e:  # the exporter raises many types; keep its log for the user
        log = path.with_suffix(".export.log")
        log.write_text(chatter.getvalue() + "\n" + "".join(traceback.format_exception(e)))
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportFailed(f"exporting {spec.file} failed: {first} (full log: {log})") from e
    _name_dims(path, spec)
    onnx.checker.check_model(str(path))
    return path
