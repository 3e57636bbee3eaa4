from __future__ import annotations

import json

import pytest

from avg_edge.errors import ConfigError
from avg_edge.model.config import AvgLlavaConfig, pool_kernel
from avg_edge.model.tiny import TINY_CLIP, tiny_config_dict


def _folder_with_tower(tmp_path):
    (tmp_path / "tiny-clip").mkdir()
    (tmp_path / "tiny-clip" / "config.json").write_text(json.dumps(TINY_CLIP))
    return tmp_path


def test_reads_released_layout_with_string_pinpoints(tmp_path):
    cfg = AvgLlavaConfig.from_dict(tiny_config_dict(), folder=_folder_with_tower(tmp_path))
    assert cfg.pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert cfg.granularities == (36, 72, 144, 288, 576)
    assert cfg.has_router and cfg.router_seq_len == 1148
    assert cfg.vision.hidden_size == 32 and cfg.vision.grid == 24
    assert cfg.max_crops == 5


def test_known_clip_tower_needs_no_folder():
    cfg = AvgLlavaConfig.from_dict(tiny_config_dict(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024))
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.patch_size) == (1024, 24, 14)


def test_unknown_keys_are_ignored(tmp_path):
    d = tiny_config_dict(totally_new_key={"x": 1})
    assert AvgLlavaConfig.from_dict(d, folder=_folder_with_tower(tmp_path)).text.hidden_size == 64


def test_missing_key_is_named(tmp_path):
    d = tiny_config_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        AvgLlavaConfig.from_dict(d, folder=_folder_with_tower(tmp_path))


def test_unknown_vision_tower_says_how_to_point_at_one():
    with pytest.raises(ConfigError, match=r"unknown vision tower 'no/such-tower'.*local folder"):
        AvgLlavaConfig.from_dict(tiny_config_dict(mm_vision_tower="no/such-tower"))


@pytest.mark.parametrize("key,value,match", [
    ("vis_token_granularity", [36, 100, 576], r"100 tokens cannot be made.*valid for this grid"),
    ("vis_token_granularity", [576, 36], "ascending"),
    ("mm_projector_type", "linear", "mm_projector_type: expected 'mlp2x_gelu'"),
    ("image_grid_pinpoints", "[(300, 672)]", r"\(300, 672\) is not a multiple of the crop size 336"),
    ("image_grid_pinpoints", "not a list", "image_grid_pinpoints"),
    ("mm_vision_select_layer", 7, "mm_vision_select_layer"),
    ("hidden_size", 0, "hidden_size: expected a positive integer"),
    ("mm_hidden_size", 99, "mm_hidden_size 99 does not match"),
])
def test_invalid_values_raise_valueerror_naming_the_key(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        AvgLlavaConfig.from_dict(tiny_config_dict(**{key: value}), folder=_folder_with_tower(tmp_path))


def test_llava_next_pinpoints_are_swapped_to_width_height():
    d = {"model_type": "llava_next", "vision_config": {k: v for k, v in TINY_CLIP.items()},
         "text_config": {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                         "num_hidden_layers": 1, "num_attention_heads": 4},
         "image_grid_pinpoints": [[672, 336], [336, 1008]]}
    cfg = AvgLlavaConfig.from_dict(d)
    assert cfg.pinpoints == ((336, 672), (1008, 336))
    assert not cfg.has_router


def test_pool_kernels_match_the_spec_table():
    assert {g: pool_kernel(g, 24) for g in (576, 288, 144, 72, 36)} == {
        576: (1, 1), 288: (1, 2), 144: (2, 2), 72: (2, 4), 36: (4, 4)}


def test_round_trip_through_our_layout(tmp_path):
    cfg = AvgLlavaConfig.from_dict(tiny_config_dict(), folder=_folder_with_tower(tmp_path))
    again = AvgLlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.replace(vision_tower=cfg.vision_tower) == cfg


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", "abc", "config.json: 'hidden_size' should be an integer, got 'abc'"),
    ("hidden_size", True, "'hidden_size' should be an integer"),
    ("num_key_value_heads", "4", "'num_key_value_heads' should be an integer or null"),
    ("rope_scaling", [1], "'rope_scaling' should be an object or null"),
    ("tie_word_embeddings", 1, "'tie_word_embeddings' should be true or false"),
    ("rms_norm_eps", float("nan"), "'rms_norm_eps' should be a number"),
    ("mm_vision_tower", 3, "'mm_vision_tower' should be a string"),
    ("vis_token_granularity", ["a"], "'vis_token_granularity' should be a list of token counts"),
    ("vis_token_granularity", "[36, 'x']", "'vis_token_granularity' should be a list of token counts"),
    ("router_num_heads", 1.0, "'router_num_heads' should be an integer"),
    ("image_grid_pinpoints", [[float("inf"), 336]], "image_grid_pinpoints: expected a list of (width, height) pairs"),
    ("image_std", [0.2, 0, 0.2], "'image_std' should be 3 numbers (none 0)"),
    ("vision_config", [1], "'vision_config' should be an object"),
    ("vision_config", {**TINY_CLIP, "patch_size": "14"}, "'vision_config.patch_size' should be an integer"),
])
def test_values_of_the_wrong_type_are_config_errors_naming_the_key(tmp_path, key, value, match):
    d = tiny_config_dict(**{key: value})
    if key == "image_std":
        d["image_mean"] = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        AvgLlavaConfig.from_dict(d, folder=_folder_with_tower(tmp_path))


def test_the_towers_own_config_is_named(tmp_path):
    folder = _folder_with_tower(tmp_path)
    (folder / "tiny-clip" / "config.json").write_text(json.dumps({**TINY_CLIP, "hidden_size": "abc"}))
    with pytest.raises(ConfigError, match=r"tiny-clip/config.json \(the vision tower's, from mm_vision_tower\): "
                                          r"'hidden_size' should be an integer"):
        AvgLlavaConfig.from_dict(tiny_config_dict(), folder=folder)
