"""The PyTorch half of validation: reference outputs at the validation points (stored in
the build's reference.npz, compared later without torch by avg_edge.validation), and
the check of the exported decoder's code against transformers' own Llama forward."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from avg_edge import validation as V
from avg_edge.export.onnx_export import torch_inputs
from avg_edge import specs as S
from avg_edge.specs import DecoderRoles, GraphSpec


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def fp32_compute(model: nn.Module) -> Iterator[None]:
    """Run a model whose weights are fp16/bf16 in fp32, one module at a time: each module
    that owns parameters casts its weights (with its children's: torch's attention reads
    out_proj.weight without calling out_proj) and its floating inputs to fp32 when it is
    entered, and its weights back when it returns.  The reference for an fp16 build is
    then the checkpoint's weights computed in fp32, with one module's weights in fp32 at
    a time instead of a whole fp32 copy (28 GB for 7B).  fp16 -> fp32 -> fp16 is exact."""
    low = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta), torch.float32)
    if low == torch.float32:
        yield
        return

    def enter(module, args, kwargs):
        for p in module.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.data = p.data.float()
        return _to_fp32(args), _to_fp32(kwargs)

    def leave(module, args, kwargs, output):
        for p in module.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.data = p.data.to(low)

    handles = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(m.register_forward_hook(leave, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fp32_feeds(feeds: dict[str, np.ndarray], spec: GraphSpec | None = None) -> dict[str, np.ndarray]:
    """fp16 inputs as fp32, except the KV cache: it stays in the graph's dtype (7B's
    cache at a 4095-token past is 2 GiB in fp16), each layer upcasts its own part."""
    keep = {t.name for t in spec.inputs if t.role in (S.PAST_KEY, S.PAST_VALUE)} if spec is not None else set()
    return {k: (v.astype(np.float32) if v.dtype == np.float16 and k not in keep else v) for k, v in feeds.items()}


def reference_outputs(module: nn.Module, spec: GraphSpec, points: list[V.Point]) -> dict[str, np.ndarray]:
    """The compared part of the module's outputs at every point (validation.compared),
    computed in fp32 whatever the weights' dtype; keyed by validation.key."""
    refs: dict[str, np.ndarray] = {}
    with torch.no_grad(), fp32_compute(module):
        for p in points:
            out = module(*torch_inputs(_fp32_feeds(p.feeds(spec), spec), spec))
            out = out if isinstance(out, (tuple, list)) else (out,)
            for name, values in V.compared(spec, p, dict(zip(spec.output_names, out))).items():
                refs[V.key(spec.name, p.name, name)] = values
            del out
    return refs


def validate_wrapper(model, spec: GraphSpec, seq: int = 37, seed: int = 1) -> float:
    """Max |logits| difference between the exported decoder's PyTorch code and transformers'
    own Llama forward on the same embeddings (the wrapper must not drift from the reference)."""
    from avg_edge.export.graphs import DecoderGraph, reference_logits

    roles = DecoderRoles(spec)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, seq, model.config.hidden_size, generator=g)

    def cache(shape, dtype):        # in place: a cache as long as this check, not the whole context
        return np.zeros((*shape[:2], seq, *shape[3:]) if roles.kind == "inplace" else shape, dtype)

    feeds = _fp32_feeds(roles.prefill_feeds(emb.numpy(), np.arange(seq), cache=roles.new_cache(cache)))
    with torch.no_grad(), fp32_compute(model):
        ours = DecoderGraph(model, spec)(*torch_inputs(feeds, spec))[spec.output_names.index(roles.name("logits"))]
        theirs = reference_logits(model, emb)
    return float((ours - theirs).abs().max())
