"""PyTorch reference of AVG-LLaVA and checkpoint loading (needs the `export` extra)."""

from avg_edge.model.checkpoint import load_model, rename_weight, save_checkpoint
from avg_edge.model.config import AvgLlavaConfig, TextConfig, VisionConfig
from avg_edge.model.llava import AvgLlavaModel

__all__ = [
    "AvgLlavaConfig", "AvgLlavaModel", "TextConfig", "VisionConfig",
    "load_model", "rename_weight", "save_checkpoint",
]
