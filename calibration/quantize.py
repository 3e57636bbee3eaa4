"""int8 and int4 ONNX graphs, one file per graph that both ONNX Runtime and TensorRT use.

int8 (every graph): ONNX Runtime's `quantize_static` in QDQ form with the settings
TensorRT accepts: symmetric int8 activations (one scale per tensor, zero-point 0) from
MinMax calibration on recorded inputs, symmetric int8 weights with one scale per output
channel, only MatMul/Gemm/Conv quantized.  (NVIDIA ModelOpt's ONNX PTQ also runs on
CPU, but its onnx extra pins onnx 1.21 / onnxruntime-gpu 1.24, which conflict with
this project's pins; README has the measured comparison.)

int4 (decoder only): round-to-nearest block-wise weight-only quantization written here
in numpy: int4 weights, positive fp scales per block of `block_size` input rows, no
zero-point, `DequantizeLinear(axis=0, block_size=B)` feeding each MatMul (opset 21, the
form TensorRT's INT4 weight-only path reads).  ONNX Runtime fuses DequantizeLinear +
MatMul into its MatMulNBits kernel when it loads the file.  ONNX Runtime's own
MatMulNBitsQuantizer was not used: its MatMulNBits op is ORT-only and its Q/DQ mode
writes negative scales or non-zero zero-points, which TensorRT rejects.  lm_head stays
in full precision.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from avg_edge.errors import AvgEdgeError

INT8_OP_TYPES = ["MatMul", "Gemm", "Conv"]
INT4_OPSET = 21


class QuantizeError(AvgEdgeError):
    pass


class _Reader:
    """ONNX Runtime CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - required by newer ORT; unused here
        pass


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Static int8 Q/DQ of one graph, calibrated on `feeds` (what the graph really saw)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise QuantizeError(f"{src.name}: no calibration inputs were recorded")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference cannot follow the decoder's past+seq arithmetic; ONNX's
        # own shape inference is enough for quantization.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=INT8_OP_TYPES,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            use_external_data_format=src.with_name(src.name + ".data").exists(),
        )
    _strip_unused_domains(dst)
    return {"method": "int8 Q/DQ (ORT quantize_static, MinMax, symmetric, per-channel weights)",
            "calibration_inputs": len(feeds)}


def _strip_unused_domains(path: Path) -> None:
    m = onnx.load(str(path), load_external_data=False)
    used = {n.domain for n in m.graph.node} | {""}
    keep = [o for o in m.opset_import if o.domain in used]
    if len(keep) != len(m.opset_import):
        del m.opset_import[:]
        m.opset_import.extend(keep)
        onnx.save(m, str(path))


class _Initializers:
    """Reads initializer data one tensor at a time (inline, or external data through a
    memory map) and writes new ones, external when the source was: a 7B decoder is
    quantized matrix by matrix, never loaded whole."""

    INLINE_BYTES = 1024     # smaller tensors stay in the graph (shape inference reads constants like axes)

    def __init__(self, src: Path, dst: Path, external: bool) -> None:
        self.src_dir = src.parent
        self.external = external
        self.location = dst.name + ".data"
        self._out = open(dst.parent / self.location, "wb") if external else None

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.memmap(self.src_dir / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=tuple(t.dims))

    def add(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """`t` (inline raw data) as the output keeps it: moved to the data file if external."""
        if self._out is None or len(t.raw_data) < self.INLINE_BYTES:
            return t
        raw = t.raw_data
        offset = self._out.tell()
        self._out.write(raw)
        external_data_helper.set_external_data(t, self.location, offset=offset, length=len(raw))
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        return t

    def copy(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """An unchanged initializer of the source, into the output."""
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return t
        out = numpy_helper.from_array(np.ascontiguousarray(self.array(t)), t.name)
        return self.add(out)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def quantize_int4(src: Path, dst: Path, block_size: int = 32) -> dict:
    """Block-wise int4 weight-only quantization of every MatMul with a constant [K, N]
    weight, except lm_head (the MatMul whose weight is [hidden, vocab]).  Scales take the
    weight's dtype (fp16 for the W4A16 decoder).  Streams: one matrix in memory at a time."""
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block size: expected a power of two >= 16, got {block_size}")
    model = onnx.load(str(src), load_external_data=False)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < INT4_OPSET:
            raise QuantizeError(f"{src.name} is opset {o.version}; int4 needs opset {INT4_OPSET} (export with --opset 21+)")
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    inits = {i.name: i for i in model.graph.initializer}
    vocab = _logits_width(model)
    store = _Initializers(src, dst, external)
    new_nodes, new_inits, quantized, skipped, replaced = [], [], 0, [], set()
    try:
        for node in model.graph.node:
            w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if w is None or len(w.dims) != 2:
                new_nodes.append(node)
                continue
            k, n = w.dims
            if n == vocab:
                skipped.append(f"{node.name} (lm_head)")
                new_nodes.append(node)
                continue
            if k % block_size:
                skipped.append(f"{node.name} (K={k} not a multiple of {block_size})")
                new_nodes.append(node)
                continue
            source = store.array(w)
            weight = np.asarray(source, dtype=np.float32)                           # [K, N], this matrix only
            blocks = weight.reshape(k // block_size, block_size, n)                 # [K/B, B, N]
            scale = np.abs(blocks).max(axis=1) / 7.0                                # [K/B, N]
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
            qname, sname, dqname = f"{w.name}_int4", f"{w.name}_scale", f"{w.name}_dq"
            new_inits.append(store.add(numpy_helper.from_array(q.astype(ml_dtypes.int4), qname)))   # packed, 2 per byte
            new_inits.append(store.add(numpy_helper.from_array(scale.astype(source.dtype), sname)))
            new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dqname], name=f"{node.name}_dq",
                                              axis=0, block_size=block_size))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], dqname], list(node.output), name=node.name))
            replaced.add(w.name)
            quantized += 1
            del weight, blocks, q, source
        if quantized == 0:
            raise QuantizeError(f"{src.name}: no MatMul with a constant weight to quantize")
        used = {i for nd in new_nodes for i in nd.input}
        kept = [store.copy(i) for i in model.graph.initializer if i.name in used and i.name not in replaced]
    finally:
        store.close()
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"method": f"int4 weight-only (round-to-nearest, block {block_size}, DequantizeLinear opset 21)",
            "matmuls_quantized": quantized, "kept_full_precision": skipped}


def _logits_width(model: onnx.ModelProto) -> int | None:
    for o in model.graph.output:
        if o.name == "logits":
            dim = o.type.tensor_type.shape.dim[-1]
            return dim.dim_value or None
    return None
