"""avg-edge: AVG-LLaVA on edge GPUs (TensorRT) and CPUs (ONNX Runtime).

Importing the package imports nothing heavy; `avg_edge.model` needs the `export`
extra (torch, transformers), `avg_edge.runtime` needs only the base install.
"""

__version__ = "0.1.0"
