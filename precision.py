"""The one precision table: graph dtype, opset policy, quantizer and validation tolerance
per precision.  Export, calibration and the CLI read it; torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from avg_edge.errors import UsageError


@dataclass(frozen=True)
class Precision:
    name: str
    float_dtype: str               # dtype of the exported weights and the graphs' float I/O
    exported_as: str               # the float precision exported (and validated) before any quantizer runs
    opsets: range                  # opsets a build of this precision can use
    default_opset: int
    quantizer: str | None          # None, "int8" (static Q/DQ, every graph) or "int4" (decoder weights)
    tolerance: tuple[float, float]  # validation against PyTorch: atol + rtol * largest |reference|
    engine_tolerance: tuple[float, float]   # TensorRT engines against the stored references
    help: str

    def opset(self, requested: int | None) -> int:
        if requested is None:
            return self.default_opset
        if requested not in self.opsets:
            raise UsageError(f"--opset: {self.name} builds use opsets {self.opsets.start}..{self.opsets.stop - 1}, "
                             f"got {requested}" + (f" ({OPSET_REASONS[self.name]})" if self.name in OPSET_REASONS else ""))
        return requested


# Opset 18: what torch's exporter emits natively and TensorRT 10.3's parser reads (9..20).
# int8: ONNX Runtime's Q/DQ writer produces an invalid model at 21+.  int4: blocked
# DequantizeLinear needs 21.
OPSET_REASONS = {"int8": "ONNX Runtime's int8 Q/DQ writer breaks at opset 21+",
                 "int4": "blocked DequantizeLinear needs opset 21"}
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    # fp32 engines: TensorRT may run fp32 MatMuls in TF32 on Ampere and later (Orin).
    Precision("fp32", "float32", "fp32", range(17, 24), 18, None, (1e-4, 1e-4), (2e-3, 2e-3), "float32 graphs"),
    Precision("fp16", "float16", "fp16", range(17, 24), 18, None, (2e-2, 2e-2), (2e-2, 2e-2),
              "float16 graphs (RMSNorm, softmax and RoPE frequencies stay fp32)"),
    # Quantized builds store references of their quantized graphs run by ONNX Runtime;
    # an engine runs the same Q/DQ graph with other kernels.
    Precision("int8", "float32", "fp32", range(17, 21), 18, "int8", (1e-4, 1e-4), (5e-2, 5e-2),
              "static int8 Q/DQ on every graph, calibrated; fp32 I/O"),
    Precision("int4", "float16", "fp16", range(21, 24), 21, "int4", (2e-2, 2e-2), (2e-2, 2e-2),
              "int4 block-wise weights on the fp16 decoder (W4A16; lm_head kept); fp16 I/O"),
)}


def precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise UsageError(f"--precision: expected one of {list(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def choices_help() -> str:
    return "; ".join(f"{p.name}: {p.help}" for p in PRECISIONS.values())
