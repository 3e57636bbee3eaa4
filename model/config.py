"""Config: frozen dataclasses mirroring the checkpoint's config.json.

Three layouts are read:
  * AVG-LLaVA (`model_type: llava_llama`): flat Llama keys plus `mm_*` keys;
  * the same written by this project (adds a `vision_config` dict, so no tower name
    needs to be known);
  * Hugging Face LLaVA-NeXT (`model_type: llava_next`): `text_config`/`vision_config`.

`from_dict` ignores unknown keys; a missing required key or a value of the wrong type
or range raises ConfigError (a ValueError) naming the file and the key.  Torch-free on
purpose.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from avg_edge import constants as C
from avg_edge.errors import ConfigError

# Vision towers whose architecture we know by name (the AVG-LLaVA config names the
# tower but does not describe it).
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768, num_channels=3,
    ),
}


# config.json of the released 7B checkpoint, as far as the export needs it (Vicuna-7B v1.5
# + CLIP ViT-L/14-336): used to print the I/O tables users will see.
AVG_LLAVA_7B_CONFIG: dict[str, Any] = {
    "model_type": "llava_llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024,
    "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
    "image_grid_pinpoints": "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]",
    "vis_token_granularity": [36, 72, 144, 288, 576], "router_select": True,
}


_REQUIRED = object()


def _fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value has the type `kind` (int, float, str, bool, dict, list,
    None, or a union of them); a float must be finite, an int is not a bool."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    if kind is type(None) or kind is None:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind in (str, dict, list):
        return isinstance(value, kind)
    return True                         # anything else: __post_init__ decides


def _kind_word(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_kind_word(k) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            list: "a list", type(None): "null"}.get(kind, str(kind))


def _get(d: Mapping[str, Any], key: str, kind: Any, default: Any = _REQUIRED, section: str = "") -> Any:
    """d[key] checked against `kind`; `default` when absent (absent and no default: an error)."""
    if key not in d:
        if default is _REQUIRED:
            raise ConfigError(f"missing required key '{section}{key}'")
        return default
    value = d[key]
    if not _fits(value, kind):
        raise ConfigError(f"'{section}{key}' should be {_kind_word(kind)}, got {value!r:.60}")
    return value


def _require(d: Mapping[str, Any], key: str, section: str = "") -> Any:
    return _get(d, key, Any, section=section)


def _known(cls, d: Mapping[str, Any], section: str = "") -> dict[str, Any]:
    """The keys of `d` that are fields of `cls`, each checked against its annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: _get(d, f.name, hints[f.name], section=section) for f in dataclasses.fields(cls) if f.name in d}


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n}: expected a positive integer, got {v!r}")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (transformers' CLIPVisionConfig fields)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    num_channels: int = 3

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "image_size", "patch_size")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")

    @property
    def grid(self) -> int:
        """Patches per side: 24 for 336/14."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "vision_config.") -> "VisionConfig":
        return cls(**_known(cls, d, section))


@dataclass(frozen=True)
class TextConfig:
    """Llama decoder (transformers' LlamaConfig fields that matter)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    def __post_init__(self) -> None:
        _positive(self, *self.REQUIRED, "max_position_embeddings")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} not divisible by num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "") -> "TextConfig":
        for k in cls.REQUIRED:
            _require(d, k, section)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):       # some configs list several; the first is </s>
            if not (eos and _fits(eos[0], int)):
                raise ConfigError(f"'{section}eos_token_id' should be an integer or a list of them, got {eos!r:.60}")
            d = {**d, "eos_token_id": eos[0]}
        return cls(**_known(cls, d, section))

    def to_llama_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pool_kernel(tokens: int, grid: int) -> tuple[int, int]:
    """(rows, cols) average-pool kernel that turns a grid x grid map into `tokens` tokens.

    Square counts pool k x k; the others pool k x 2k (576 -> 1x1, 288 -> 1x2, 144 -> 2x2,
    72 -> 2x4, 36 -> 4x4 on the 24x24 grid).  Raises ConfigError when none fits.
    """
    for k in range(1, grid + 1):
        if grid % k:
            continue
        if tokens * k * k == grid * grid:
            return (k, k)
        if grid % (2 * k) == 0 and 2 * tokens * k * k == grid * grid:
            return (k, 2 * k)
    raise ConfigError(
        f"vis_token_granularity: {tokens} tokens cannot be made by pooling a {grid}x{grid} grid "
        f"with a k x k or k x 2k kernel; valid for this grid: {valid_granularities(grid)}"
    )


def valid_granularities(grid: int) -> list[int]:
    out = set()
    for k in range(1, grid + 1):
        if grid % k == 0:
            out.add((grid // k) ** 2)
            if grid % (2 * k) == 0:
                out.add((grid // k) * (grid // (2 * k)))
    return sorted(out)


def _parse_pinpoints(value: Any, swap: bool) -> tuple[tuple[int, int], ...]:
    if isinstance(value, str):  # the released config stores "[(336, 672), ...]" or "[[336, 672], ...]"
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"image_grid_pinpoints: expected a list of (width, height) pairs, got the string {value!r}") from e
    try:
        pairs = tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"image_grid_pinpoints: expected a list of (width, height) pairs, got {value!r}") from e
    if not pairs:
        raise ConfigError("image_grid_pinpoints: expected at least one (width, height) pair, got an empty list")
    return tuple((b, a) for a, b in pairs) if swap else pairs


@dataclass(frozen=True)
class AvgLlavaConfig:
    """The whole model.  `pinpoints` are (width, height), the original code's order."""

    text: TextConfig
    vision: VisionConfig
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "anyres"
    pinpoints: tuple[tuple[int, int], ...] = C.DEFAULT_PINPOINTS
    patch_merge_type: str = "spatial_unpad"
    granularities: tuple[int, ...] = C.DEFAULT_GRANULARITIES
    has_router: bool = True
    filtered_text_num: int = C.DEFAULT_FILTERED_TEXT_NUM
    router_num_heads: int = C.DEFAULT_ROUTER_HEADS
    # The prompt tokens the router's text filter chooses from: "prompt" (the spec: every
    # token of the prompt, system prompt included) or "question" (the question's own
    # tokens; the demo uses it, a 32-token system prompt otherwise crowds the question out).
    router_text_candidates: str = C.ROUTER_TEXT_FROM_PROMPT
    # The token cost the router was aligned with (model/rglf.py; 0 = the paper's RGLF).
    # A record of training, read by the exporter into the manifest, not by the maths.
    router_token_cost: float = 0.0
    image_mean: tuple[float, float, float] = C.CLIP_MEAN
    image_std: tuple[float, float, float] = C.CLIP_STD
    source_layout: str = "llava_llama"  # or "llava_next" (Hugging Face)

    def __post_init__(self) -> None:
        if self.select_feature != "patch":
            raise ConfigError(f"mm_vision_select_feature: expected 'patch', got {self.select_feature!r}")
        if self.projector_type != "mlp2x_gelu":
            raise ConfigError(f"mm_projector_type: expected 'mlp2x_gelu', got {self.projector_type!r}")
        if self.image_aspect_ratio != "anyres":
            raise ConfigError(f"image_aspect_ratio: expected 'anyres', got {self.image_aspect_ratio!r}")
        if self.patch_merge_type != "spatial_unpad":
            raise ConfigError(f"mm_patch_merge_type: expected 'spatial_unpad', got {self.patch_merge_type!r}")
        n_layers = self.vision.num_hidden_layers
        if not (-n_layers - 1 <= self.select_layer <= n_layers) or self.select_layer == 0:
            raise ConfigError(f"mm_vision_select_layer: expected -{n_layers + 1}..-1 or 1..{n_layers}, got {self.select_layer}")
        if not self.granularities or list(self.granularities) != sorted(set(self.granularities)):
            raise ConfigError(f"vis_token_granularity: expected distinct counts in ascending order, got {list(self.granularities)}")
        for g in self.granularities:
            pool_kernel(g, self.vision.grid)
        if self.granularities[-1] != self.vision.grid ** 2:
            raise ConfigError(f"vis_token_granularity: the finest must be the full grid {self.vision.grid ** 2}, got {self.granularities[-1]}")
        for w, h in self.pinpoints:
            if w <= 0 or h <= 0 or w % self.crop_size or h % self.crop_size:
                raise ConfigError(f"image_grid_pinpoints: ({w}, {h}) is not a multiple of the crop size {self.crop_size}")
        if self.has_router and self.text.hidden_size % self.router_num_heads:
            raise ConfigError(f"router heads {self.router_num_heads} do not divide hidden_size {self.text.hidden_size}")
        _positive(self, "filtered_text_num")
        if not (math.isfinite(self.router_token_cost) and self.router_token_cost >= 0):
            raise ConfigError(f"router_token_cost: expected a finite number >= 0, got {self.router_token_cost!r}")
        if self.router_text_candidates not in C.ROUTER_TEXT_FROM:
            raise ConfigError(f"router_text_candidates: expected one of {list(C.ROUTER_TEXT_FROM)}, "
                              f"got {self.router_text_candidates!r}")

    # -- derived ---------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        return self.vision.image_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def router_seq_len(self) -> int:
        """Tokens per crop the router reads: all granularities plus the filtered text (1148)."""
        return sum(self.granularities) + self.filtered_text_num

    @property
    def max_crops(self) -> int:
        tiles = max((w // self.crop_size) * (h // self.crop_size) for w, h in self.pinpoints)
        return 1 + tiles

    # -- reading -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], folder: Path | None = None, where: str = C.CONFIG_FILE) -> "AvgLlavaConfig":
        """Every error names `where` (the file) and the key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls._from_dict(d, folder)
        except ConfigError as e:
            if getattr(e, "located", False):
                raise
            located = ConfigError(f"{where}: {e}")
            located.located = True
            raise located from e

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any], folder: Path | None) -> "AvgLlavaConfig":
        model_type = d.get("model_type")
        if model_type == "llava_next":
            return cls._from_llava_next(d)
        if model_type not in ("llava_llama", "llava", None):
            raise ConfigError(f"model_type: expected 'llava_llama' or 'llava_next', got {model_type!r}")
        text = TextConfig.from_dict(d)
        tower = _get(d, "mm_vision_tower", str)
        vision = _vision_for(d, tower, folder)
        kw: dict[str, Any] = dict(
            text=text,
            vision=vision,
            vision_tower=tower,
            select_layer=_get(d, "mm_vision_select_layer", int),
            select_feature=_get(d, "mm_vision_select_feature", str, "patch"),
            projector_type=_get(d, "mm_projector_type", str),
            image_aspect_ratio=_get(d, "image_aspect_ratio", str, "anyres"),
            pinpoints=_parse_pinpoints(d.get("image_grid_pinpoints", C.DEFAULT_PINPOINTS), swap=False),
            patch_merge_type=_get(d, "mm_patch_merge_type", str, "spatial_unpad"),
            granularities=_parse_granularities(d.get("vis_token_granularity", list(C.DEFAULT_GRANULARITIES))),
            has_router=_get(d, "router_select", bool, False),
            filtered_text_num=_get(d, "filtered_text_num", int, C.DEFAULT_FILTERED_TEXT_NUM),
            router_num_heads=_get(d, "router_num_heads", int, C.DEFAULT_ROUTER_HEADS),
            router_text_candidates=_get(d, "router_text_candidates", str, C.ROUTER_TEXT_FROM_PROMPT),
            router_token_cost=float(_get(d, "router_token_cost", float, 0.0)),
        )
        if "mm_hidden_size" in d and _get(d, "mm_hidden_size", int) != vision.hidden_size:
            raise ConfigError(f"mm_hidden_size {d['mm_hidden_size']} does not match the vision tower's hidden_size {vision.hidden_size}")
        if "image_mean" in d or "image_std" in d:
            for key in ("image_mean", "image_std"):
                v = _get(d, key, list)
                if len(v) != 3 or not all(_fits(x, float) for x in v) or (key == "image_std" and 0 in v):
                    raise ConfigError(f"'{key}' should be 3 numbers{' (none 0)' if key == 'image_std' else ''}, got {v!r:.60}")
                kw[key] = tuple(float(x) for x in v)
        return cls(**kw)

    @classmethod
    def _from_llava_next(cls, d: Mapping[str, Any]) -> "AvgLlavaConfig":
        text_d = dict(_get(d, "text_config", dict))
        text_d.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        tmt = text_d.get("model_type", "llama")
        if tmt != "llama":
            raise ConfigError(f"text_config.model_type: only Llama text models are supported, got {tmt!r}")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy: expected 'default' (patch tokens), got {strategy!r}")
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ConfigError(f"projector_hidden_act: expected 'gelu', got {d.get('projector_hidden_act')!r}")
        if not d.get("multimodal_projector_bias", True):
            raise ConfigError("multimodal_projector_bias: expected true (mlp2x_gelu has biases), got false")
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer: expected one integer, got {layer!r}")
        return cls(
            text=TextConfig.from_dict(text_d, section="text_config."),
            vision=VisionConfig.from_dict(_get(d, "vision_config", dict)),
            vision_tower="(in checkpoint)",
            select_layer=layer,
            pinpoints=_parse_pinpoints(d.get("image_grid_pinpoints", [[h, w] for w, h in C.DEFAULT_PINPOINTS]), swap=True),
            has_router=False,
            source_layout="llava_next",
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "AvgLlavaConfig":
        folder = Path(folder)
        path = folder / C.CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{folder}: no {C.CONFIG_FILE} (expected a checkpoint folder with config.json and *.safetensors)")
        return cls.from_dict(_read_json(path), folder=folder, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """This project's own layout: AVG-LLaVA keys plus an explicit vision_config."""
        d = dict(self.text.to_llama_dict())
        d.update(
            model_type="llava_llama",
            architectures=["LlavaLlamaForCausalLM"],
            mm_vision_tower=self.vision_tower,
            vision_config=dataclasses.asdict(self.vision),
            mm_vision_select_layer=self.select_layer,
            mm_vision_select_feature=self.select_feature,
            mm_projector_type=self.projector_type,
            mm_hidden_size=self.vision.hidden_size,
            image_aspect_ratio=self.image_aspect_ratio,
            image_grid_pinpoints=[list(p) for p in self.pinpoints],
            mm_patch_merge_type=self.patch_merge_type,
            vis_token_granularity=list(self.granularities),
            router_select=self.has_router,
            filtered_text_num=self.filtered_text_num,
            router_num_heads=self.router_num_heads,
            router_text_candidates=self.router_text_candidates,
            router_token_cost=self.router_token_cost,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
        return d

    def replace(self, **changes: Any) -> "AvgLlavaConfig":
        return dataclasses.replace(self, **changes)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid UTF-8 JSON ({e})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from e


def _parse_granularities(value: Any) -> tuple[int, ...]:
    """vis_token_granularity: a list of token counts, one count, or the list as a string."""
    parsed = value
    if isinstance(parsed, str):
        try:
            parsed = ast.literal_eval(parsed)
        except (ValueError, SyntaxError):
            pass
    if _fits(parsed, int):
        parsed = [parsed]
    if not (isinstance(parsed, (list, tuple)) and all(_fits(g, int) for g in parsed)):
        raise ConfigError(f"'vis_token_granularity' should be a list of token counts such as [36, 72, 144, 288, 576], "
                          f"got {value!r:.60}")
    return tuple(parsed)


def _vision_for(d: Mapping[str, Any], tower: str, folder: Path | None) -> VisionConfig:
    """The tower's architecture: explicit `vision_config`, a known name, or a local folder."""
    if "vision_config" in d:
        return VisionConfig.from_dict(_get(d, "vision_config", dict))
    if tower in KNOWN_VISION_TOWERS:
        return VisionConfig(**KNOWN_VISION_TOWERS[tower])
    candidates = [Path(tower)]
    if folder is not None and not Path(tower).is_absolute():
        candidates.insert(0, folder / tower)
    for cand in candidates:
        cfg = cand / C.CONFIG_FILE
        if cfg.is_file():
            vd = _read_json(cfg)
            try:
                if not isinstance(vd, dict):
                    raise ConfigError(f"expected a JSON object, got {type(vd).__name__}")
                if vd.get("model_type") == "clip" or "vision_config" in vd:
                    vd = _get(vd, "vision_config", dict, {})
                return VisionConfig.from_dict(vd, section="")
            except ConfigError as e:
                located = ConfigError(f"{cfg} (the vision tower's, from mm_vision_tower): {e}")
                located.located = True
                raise located from e
    raise ConfigError(
        f"mm_vision_tower: unknown vision tower {tower!r}. Known by name: {sorted(KNOWN_VISION_TOWERS)}. "
        "Hint: set mm_vision_tower in config.json to a local folder holding that tower's config.json "
        "(CLIP or CLIPVision), or add a 'vision_config' dict to config.json."
    )


__all__ = ["AvgLlavaConfig", "TextConfig", "VisionConfig", "KNOWN_VISION_TOWERS", "pool_kernel", "valid_granularities"]
