"""avg-edge: AVG-LLaVA on edge GPUs (TensorRT) and CPUs (ONNX Runtime).

    from avg_edge import Pipeline      # the torch-free runtime (base install)
    from avg_edge import load_model    # the PyTorch reference (the `export` extra); imports torch when called

Importing the package imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from avg_edge.runtime.pipeline import Pipeline


def load_model(path: Any, *args: Any, **kwargs: Any) -> Any:
    """The PyTorch reference from a local checkpoint folder (avg_edge.model.load_model);
    needs the `export` extra and imports torch only now."""
    from avg_edge.errors import MissingExtra

    try:
        from avg_edge.model import load_model as _load_model
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "transformers", "safetensors"):
            raise
        raise MissingExtra("load_model", "export", e.name) from e
    return _load_model(path, *args, **kwargs)


def __getattr__(name: str) -> Any:
    # `from avg_edge import Pipeline` imports the runtime on first use, so that importing
    # avg_edge.errors (every command does) stays cheap.
    if name == "Pipeline":
        from avg_edge.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'avg_edge' has no attribute {name!r}")


__all__ = ["Pipeline", "__version__", "load_model"]
