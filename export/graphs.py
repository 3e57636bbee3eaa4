"""The three exported graphs as torch modules whose positional I/O follow the specs.

They reuse the reference's submodules (same weights, same code where the reference's
code exports); the decoder runs the Llama layers with explicit past/present tensors
instead of transformers' cache objects, computes logits only at `logit_positions`, and
finds each of its inputs and outputs by role (specs.DecoderRoles), not by position.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from avg_edge import specs as S
from avg_edge.model.llava import AvgLlavaModel


# -- attention over a fixed-capacity cache updated in place -----------------------------------
@torch.library.custom_op("avg_edge::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     past_length: torch.Tensor, num_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, s, H*hd], k/v [B, s, KV*hd] (q and k already rotated), cache [B, KV, cap, hd]
    with past_length[r] valid rows for request r -> (out [B, s, H*hd], cache with rows
    past..past+s of each request written).  Causal over the cache: query i of request r
    sees rows 0..past_length[r]+i of its own cache.  The same maths as the concat path,
    one request at a time; in ONNX it becomes ONNX Runtime's GroupQueryAttention, which
    writes the new rows into a cache bound as both its past and its present."""
    b, s, _ = q.shape
    hd = cache_k.shape[-1]
    kn = k.view(b, s, kv_heads, hd).transpose(1, 2)                             # [B, KV, s, hd]
    vn = v.view(b, s, kv_heads, hd).transpose(1, 2)
    qh = q.view(b, s, num_heads, hd).transpose(1, 2)                             # [B, H, s, hd]
    ck, cv = cache_k.clone(), cache_v.clone()
    rep = num_heads // kv_heads
    out = []
    for r in range(b):
        past = int(past_length.reshape(-1)[r])
        ck[r, :, past:past + s] = kn[r].to(ck.dtype)
        cv[r, :, past:past + s] = vn[r].to(cv.dtype)
        kk = ck[r:r + 1, :, :past + s].to(q.dtype).repeat_interleave(rep, dim=1)      # [1, H, t, hd]
        vv = cv[r:r + 1, :, :past + s].to(q.dtype).repeat_interleave(rep, dim=1)
        scores = (qh[r:r + 1] @ kk.transpose(2, 3)).float() / math.sqrt(hd)           # [1, H, s, t] fp32
        allowed = torch.arange(past + s)[None, :] <= (past + torch.arange(s))[:, None]
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        out.append((torch.softmax(scores, dim=-1).to(vv.dtype) @ vv).transpose(1, 2).reshape(1, s, -1))
    return torch.cat(out), ck, cv


@cached_attention.register_fake
def _(q, k, v, cache_k, cache_v, past_length, num_heads, kv_heads):
    return torch.empty_like(q), torch.empty_like(cache_k), torch.empty_like(cache_v)


def cached_attention_onnx(q, k, v, cache_k, cache_v, past_length, num_heads: int, kv_heads: int):
    """ONNX for cached_attention: com.microsoft.GroupQueryAttention with seqlens_k = past + s - 1
    per request ([B] int32) and total_sequence_length = the longest request's past + s."""
    from onnxscript import INT32
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    group_query_attention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    total = op.Add(past_length, op.Shape(q, start=1, end=2))                    # [B] int64
    seqlens_k = op.Cast(op.Sub(total, op.Constant(value_ints=[1])), to=INT32.dtype)
    total_len = op.Cast(op.ReduceMax(total, keepdims=0), to=INT32.dtype)        # scalar
    out, present_k, present_v = group_query_attention(q, k, v, cache_k, cache_v, seqlens_k, total_len,
                                                      num_heads=num_heads, kv_num_heads=kv_heads, _num_outputs=3)
    return out, present_k, present_v


def _gqa_schema():
    """onnx knows no schema for ONNX Runtime's contrib ops and the exporter's tracer needs
    one: GroupQueryAttention's signature, as far as this graph uses it (ORT's docs,
    com.microsoft.GroupQueryAttention, version 1)."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("past_key", "T"), P("past_value", "T"),
                P("seqlens_k", "M"), P("total_sequence_length", "M")],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", floats, "float tensors"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads")],
    )


def cached_attention_standard_onnx(q, k, v, cache_k, cache_v, past_length, num_heads: int, kv_heads: int):
    """ONNX for cached_attention with standard operators only (opset 24): TensorScatter
    writes the new rows of each request at its past_length, and Attention reads the whole
    capacity under a mask allowing key j for query i of request r iff j <= past[r] + i.
    TensorRT 10.15+ parses these two onto IKVCacheUpdate (which needs the cache as a
    network input and its output bound to the same memory) and IAttention.  ONNX Runtime
    runs them too, attending over the whole capacity (see README: --cache-op)."""
    from onnx.defs import get_schema
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    opset24 = Opset("", 24)
    tensor_scatter = Op(opset24, "TensorScatter", get_schema("TensorScatter", 24, ""))
    attention = Op(opset24, "Attention", get_schema("Attention", 24, ""))
    batch, seq = op.Shape(q, start=0, end=1), op.Shape(q, start=1, end=2)
    head_dim = op.Shape(cache_k, start=3, end=4)

    def heads(x, n: int):                                                      # [B, s, n*hd] -> [B, n, s, hd]
        return op.Transpose(op.Reshape(x, op.Concat(batch, seq, op.Constant(value_ints=[n]), head_dim, axis=0)),
                            perm=[0, 2, 1, 3])

    present_k = tensor_scatter(cache_k, heads(k, kv_heads), past_length, axis=2)   # [B, KV, cap, hd]
    present_v = tensor_scatter(cache_v, heads(v, kv_heads), past_length, axis=2)
    keys = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(cache_k, start=2, end=3)), op.Constant(value_int=1))
    rows = op.Range(op.Constant(value_int=0), op.Squeeze(seq), op.Constant(value_int=1))
    last = op.Add(op.Unsqueeze(past_length, op.Constant(value_ints=[1, 2, 3])),          # [B, 1, s, 1]
                  op.Unsqueeze(rows, op.Constant(value_ints=[0, 1, 3])))
    allowed = op.LessOrEqual(op.Unsqueeze(keys, op.Constant(value_ints=[0, 1, 2])), last)  # [B, 1, s, cap]
    y = attention(heads(q, num_heads), present_k, present_v, allowed)[0]             # [B, H, s, hd]
    out = op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Concat(batch, seq, op.Constant(value_ints=[-1]), axis=0))
    return out, present_k, present_v


# The in-place cache's operators by name (specs.CACHE_OPS, --cache-op).
TRANSLATIONS = {"gqa": cached_attention_onnx, "tensorscatter": cached_attention_standard_onnx}


def custom_translations(cache_op: str = "gqa") -> dict:
    return {torch.ops.avg_edge.cached_attention.default: TRANSLATIONS[cache_op]}


class VisionGraph(nn.Module):
    """pixel_values [crops, 3, 336, 336] -> features_g [crops, g, D] for every granularity."""

    def __init__(self, model: AvgLlavaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scaled = self.model.visual_features(pixel_values)           # {g: [crops, g, D]}
        return tuple(scaled[g] for g in self.model.config.granularities)


class RouterGraph(nn.Module):
    """features_576 -> image_votes [5], text_direction [D] (float32): the router's image
    part (the coarser granularities are pools of the 576 tokens, made inside); its text
    part is router_text_table()."""

    def __init__(self, model: AvgLlavaModel) -> None:
        super().__init__()
        if model.router is None:
            raise ValueError("this model has no router")
        self.router = model.router
        self.granularities = model.config.granularities

    def forward(self, finest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router.image_votes(finest).float(), self.router.text_direction(finest).float()


def router_text_table(model: AvgLlavaModel, chunk: int = 4096) -> dict[str, np.ndarray]:
    """The router's text part for runtime/router.py, computed in fp32 whatever the
    weights' dtype: token_votes [vocab, 5] (every token's votes before its position's
    weight), pad_votes [5] (a zero row's), text_weight [k] (the voter's text rows),
    norm_weight, norm_bias [5] and norm_eps of the final LayerNorm."""
    from avg_edge.export.validate import fp32_compute

    router = model.router
    table = model.language_model.get_input_embeddings().weight              # [vocab, D]
    with torch.no_grad(), fp32_compute(router):
        votes = [router.token_votes(table[i:i + chunk].float()) for i in range(0, table.shape[0], chunk)]
        pad = router.token_votes(table.new_zeros(1, table.shape[1], dtype=torch.float32))[0]
    f32 = lambda t: t.detach().float().numpy()                              # noqa: E731
    return {"token_votes": np.concatenate([f32(v) for v in votes]), "pad_votes": f32(pad),
            "text_weight": f32(router.voter[-router.k:, 0]), "norm_weight": f32(router.norm.weight),
            "norm_bias": f32(router.norm.bias), "norm_eps": np.asarray(router.norm.eps, np.float32)}


class DecoderGraph(nn.Module):
    """One Llama step over `seq` new positions with an explicit KV cache.  Inputs and
    outputs in the spec's order, found by role:

    inputs_embeds [1, seq, D], attention_mask [1, past + seq], position_ids [1, seq],
    logit_positions [K], past key/value [1, kv_heads, past, head_dim] of each layer
    -> logits [1, K, vocab] (float32), present key/value [1, kv_heads, past + seq, head_dim].
    In place: past_length [B] instead of the mask, caches [B, kv_heads, ctx, head_dim]
    in and out, and every other tensor with B rows (one request each).
    """

    def __init__(self, model: AvgLlavaModel, spec: S.GraphSpec) -> None:
        super().__init__()
        lm = model.language_model
        self.layers = lm.model.layers
        self.norm = lm.model.norm
        self.rotary = lm.model.rotary_emb
        self.lm_head = lm.lm_head
        t = model.config.text
        self.n_heads, self.n_kv, self.head_dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.spec = spec
        self.roles = S.DecoderRoles(spec)

    def _attend_inplace(self, layer, h: torch.Tensor, cos, sin, cache_k, cache_v, past_length):
        attn = layer.self_attn
        b, s, _ = h.shape
        q = attn.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, s, hd]
        k = attn.k_proj(h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)      # [B, KV, s, hd]
        v = attn.v_proj(h)                                                          # [B, s, KV*hd]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out, ck, cv = torch.ops.avg_edge.cached_attention(
            q.transpose(1, 2).reshape(b, s, -1), k.transpose(1, 2).reshape(b, s, -1), v, cache_k, cache_v,
            past_length, self.n_heads, self.n_kv)
        return attn.o_proj(out), ck, cv

    def _attend(self, layer, h: torch.Tensor, cos, sin, past_k, past_v, allowed):
        attn = layer.self_attn
        b, s, _ = h.shape
        q = attn.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)   # [1, H, s, hd]
        k = attn.k_proj(h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)      # [1, KV, s, hd]
        v = attn.v_proj(h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)      # [1, KV, s, hd]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # The cache keeps its own dtype (the graph's; when the reference computes an fp16
        # build in fp32, the cache stays fp16 and only this layer's copy is upcast).
        k = torch.cat([past_k.to(k.dtype), k], dim=2)                                # [1, KV, t, hd]
        v = torch.cat([past_v.to(v.dtype), v], dim=2)                                # [1, KV, t, hd]
        rep = self.n_heads // self.n_kv
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k                       # [1, H, t, hd]
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = (q @ kk.transpose(2, 3)).float() / math.sqrt(self.head_dim)        # [1, H, s, t] fp32
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(vv.dtype)                           # fp32 softmax
        out = (probs @ vv).transpose(1, 2).reshape(b, s, -1)                          # [1, s, H*hd]
        return attn.o_proj(out), k.to(past_k.dtype), v.to(past_v.dtype)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = dict(zip(self.spec.input_names, inputs))
        r = self.roles
        inputs_embeds = x[r.name(S.INPUTS_EMBEDS)]
        position_ids, logit_positions = x[r.name(S.POSITION_IDS)], x[r.name(S.LOGIT_POSITIONS)]
        if r.kind == "inplace":
            past_length = x[r.name(S.PAST_LENGTH)]
            attend = lambda layer, h, pk, pv: self._attend_inplace(layer, h, cos, sin, pk, pv, past_length)  # noqa: E731
        else:
            attention_mask = x[r.name(S.ATTENTION_MASK)]
            s = inputs_embeds.shape[1]
            t = attention_mask.shape[1]
            query_pos = torch.arange(s, device=inputs_embeds.device) + (t - s)            # [s]
            key_pos = torch.arange(t, device=inputs_embeds.device)                       # [t]
            causal = key_pos[None, :] <= query_pos[:, None]                              # [s, t]
            allowed = (causal[None, None] & (attention_mask[:, None, None, :] > 0))      # [1, 1, s, t]
            attend = lambda layer, h, pk, pv: self._attend(layer, h, cos, sin, pk, pv, allowed)  # noqa: E731
        cos, sin = self.rotary(inputs_embeds, position_ids)                          # [1, s, hd]
        h = inputs_embeds
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            past_k, past_v = x[r.name(S.PAST_KEY, i)], x[r.name(S.PAST_VALUE, i)]
            a, k, v = attend(layer, layer.input_layernorm(h), past_k, past_v)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            out[r.name(S.PRESENT_KEY, i)], out[r.name(S.PRESENT_VALUE, i)] = k, v
        h = self.norm(h.index_select(1, logit_positions))                            # [B, K, D]
        out[r.name(S.LOGITS)] = self.lm_head(h).float()                              # [B, K, vocab]
        return tuple(out[n] for n in self.spec.output_names)


def graph_module(name: str, model: AvgLlavaModel, spec: S.GraphSpec) -> nn.Module:
    """The torch module that exports (and is validated as) the graph `name`."""
    if name == S.VISION:
        return VisionGraph(model)
    if name == S.ROUTER:
        return RouterGraph(model)
    if name == S.DECODER:
        return DecoderGraph(model, spec)
    raise ValueError(f"no graph named {name!r}")


def release(model: AvgLlavaModel, graph: str) -> None:
    """Drop the weights only `graph` needed once it is exported and its references are
    computed (graphs go vision, router, decoder), so a build never holds more than the
    model it has left."""
    if graph == S.VISION:
        model.vision_tower = None
        model.mm_projector = None
    elif graph == S.ROUTER:
        model.router = None
    elif graph == S.DECODER:
        model.language_model = None


def to_precision(model: AvgLlavaModel, dtype: torch.dtype) -> AvgLlavaModel:
    """The model in `dtype` (a copy unless fp32); fragile parts stay fp32 (see cast_)."""
    return model if dtype == torch.float32 else copy.deepcopy(model).cast_(dtype)


def reference_logits(model: AvgLlavaModel, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Logits of every position straight from transformers (what the decoder must match)."""
    with torch.no_grad():
        return model.language_model(inputs_embeds=inputs_embeds).logits.float()


__all__ = ["VisionGraph", "RouterGraph", "router_text_table", "DecoderGraph", "graph_module", "reference_logits", "to_precision"]
