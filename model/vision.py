"""Vision tower (CLIP ViT, a chosen hidden layer, patch tokens) and the mlp2x_gelu projector."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from avg_edge.model.config import AvgLlavaConfig


class VisionTower(nn.Module):
    """CLIP vision transformer; returns the patch tokens of `select_layer` (CLS dropped)."""

    def __init__(self, config: AvgLlavaConfig) -> None:
        super().__init__()
        v = config.vision
        n = v.num_hidden_layers
        # hidden_states[k] is the output of k layers (0 = embeddings); -2 -> n - 1 layers.
        self.layers_used = config.select_layer % (n + 1)
        self.clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps, projection_dim=v.projection_dim, num_channels=v.num_channels,
            attn_implementation="eager",
        ))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [crops, 3, 336, 336]
        # Runs only the layers the selected hidden state needs (the last one would be wasted).
        clip = self.clip
        hidden = clip.pre_layrnorm(clip.embeddings(pixel_values))  # [crops, 1 + 576, 1024]
        for layer in clip.encoder.layers[: self.layers_used]:
            hidden = layer(hidden, None)                            # [crops, 1 + 576, 1024]
        return hidden[:, 1:]                                        # [crops, 576, 1024] patch tokens only


class Projector(nn.Sequential):
    """mlp2x_gelu: Linear(vision -> text), GELU, Linear(text -> text); names `0.*`, `2.*`."""

    def __init__(self, config: AvgLlavaConfig) -> None:
        super().__init__(
            nn.Linear(config.vision.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
