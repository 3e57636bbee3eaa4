"""Loading: layout 1 (sharded, string pinpoints, sentencepiece), Stage3, strict errors."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from avg_edge.errors import CheckpointError, ConfigError, ImageError, InputError
from avg_edge.model import load_model
from avg_edge.runtime.packing import visual_token_count
from avg_edge.model.tiny import textured_image

SPEC_PREFIXES = (
    "model.vision_tower.vision_tower.vision_model.", "model.mm_projector.0.", "model.mm_projector.2.",
    "model.image_newline", "model.router.merger.self_attn.in_proj_weight", "model.router.router.0.",
    "model.router.router.2.", "model.router.voter", "model.router.norm.", "model.layers.",
    "model.embed_tokens.", "model.norm.", "lm_head.",
)


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_released_layout_is_sharded_and_named_as_the_spec(tiny_ckpt):
    names = set(_index(tiny_ckpt)["weight_map"])
    assert len(set(_index(tiny_ckpt)["weight_map"].values())) >= 2
    for prefix in SPEC_PREFIXES:
        assert any(n.startswith(prefix) for n in names), prefix
    assert isinstance(json.loads((tiny_ckpt / "config.json").read_text())["image_grid_pinpoints"], str)
    assert (tiny_ckpt / "tokenizer.model").is_file() and not (tiny_ckpt / "tokenizer.json").exists()


def test_loads_strictly_and_generates_with_the_router(tiny_ckpt, tiny_model):
    from safetensors import safe_open

    # Every checkpoint tensor landed in the model (spot-check one per part).
    for ck, mod in [("model.router.voter", "router.voter"), ("model.image_newline", "image_newline"),
                    ("lm_head.weight", "language_model.lm_head.weight"),
                    ("model.vision_tower.vision_tower.vision_model.post_layernorm.weight", "vision_tower.clip.post_layernorm.weight")]:
        shard = tiny_ckpt / _index(tiny_ckpt)["weight_map"][ck]
        with safe_open(str(shard), "pt") as f:
            assert torch.equal(f.get_tensor(ck), tiny_model.state_dict()[mod])
    image = textured_image(640, 480, seed=5)
    r = tiny_model.generate(image, "What colour is the background?", max_new_tokens=6)
    assert r.router_logits is not None and len(r.router_logits) == 5
    assert r.granularity == (36, 72, 144, 288, 576)[max(range(5), key=r.router_logits.__getitem__)]
    assert r.visual_tokens == visual_token_count(r.granularity, (2, 2), (640, 480))
    assert 1 <= len(r.token_ids) <= 6 and r.text == tiny_model.tokenizer.decode(r.token_ids).strip()
    again = tiny_model.generate(image, "What colour is the background?", max_new_tokens=6)
    assert again.token_ids == r.token_ids


def test_forced_granularity_skips_the_router(tiny_model):
    r = tiny_model.generate(textured_image(672, 672), "How many dots?", granularity=144, max_new_tokens=3)
    assert (r.granularity, r.router_logits, r.visual_tokens) == (144, None, 744)


def test_second_chunk_is_tokenised_on_its_own(tiny_model):
    prep = tiny_model.prepare(textured_image(336, 336), "How many dots?", granularity=36)
    sp = tiny_model.tokenizer._sp
    assert prep.ids_before[0] == 1 and 1 not in prep.ids_before[1:] + prep.ids_after
    assert sp.id_to_piece(prep.ids_after[0]) == "▁" and sp.id_to_piece(prep.ids_after[1]) == "<0x0A>"
    assert sp.decode(prep.ids_before[1:]).endswith("questions. USER: ")  # trailing space kept


def test_stage3_without_router_uses_finest_and_says_so_once(tiny_stage3_ckpt, caplog):
    model = load_model(tiny_stage3_ckpt)
    assert model.router is None
    with caplog.at_level(logging.WARNING, logger="avg_edge"):
        r1 = model.generate(textured_image(300, 900), "What code is printed?", max_new_tokens=2)
        r2 = model.generate(textured_image(300, 900), "What code is printed?", max_new_tokens=2)
    assert r1.granularity == r2.granularity == 576 and r1.router_logits is None
    assert sum("no router" in rec.message for rec in caplog.records) == 1
    assert model.generate(textured_image(300, 900), "What?", granularity=72, max_new_tokens=1).granularity == 72


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) \['model-00002-of-00003.safetensors'\]"):
        load_model(folder)


def test_unexpected_weight_is_listed(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    shard = folder / "model-00001-of-00003.safetensors"
    tensors = load_file(str(shard))
    tensors["model.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    index = _index(folder)
    index["weight_map"]["model.surprise.weight"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected 1 weight\(s\): model.surprise.weight"):
        load_model(folder)


def test_missing_weight_is_listed(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    index = _index(folder)
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 weight\(s\): language_model.model.norm.weight"):
        load_model(folder)


def test_router_weights_without_router_select_get_a_hint(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["router_select"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected \d+ weight.*model.router.*lacks router_select=true"):
        load_model(folder)


def test_missing_config_key(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["mm_vision_select_layer"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required key 'mm_vision_select_layer'"):
        load_model(folder)


def test_unknown_vision_tower(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    shutil.rmtree(folder / "tiny-clip")
    with pytest.raises(ConfigError, match=r"unknown vision tower 'tiny-clip'.*Hint"):
        load_model(folder)


def test_pickle_checkpoints_are_refused(tmp_path, tiny_ckpt):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_ckpt / "config.json", folder)
    shutil.copytree(tiny_ckpt / "tiny-clip", folder / "tiny-clip")
    shutil.copy(tiny_ckpt / "tokenizer.model", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are not loaded.*safetensors"):
        load_model(folder)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    name = "model.image_newline"
    shard = folder / _index(folder)["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"'model.image_newline' has shape \(3,\), the config expects \(64,\)"):
        load_model(folder)


def test_missing_folder():
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model("/nonexistent/avg-llava")


@pytest.mark.parametrize("image,question,granularity,exc,match", [
    (b"", "q?", None, ImageError, "empty"),
    (b"definitely not an image", "q?", None, ImageError, "image"),
    ("GOOD", "   ", None, InputError, "empty question"),
    ("GOOD", "q?", 100, InputError, r"expected one of \[36, 72, 144, 288, 576\]"),
    ("GOOD", "q?", "36", InputError, "granularity"),
])
def test_bad_input_to_generate(tiny_model, image, question, granularity, exc, match):
    if image == "GOOD":
        image = textured_image(100, 100)
    with pytest.raises(exc, match=match):
        tiny_model.generate(image, question, granularity=granularity, max_new_tokens=2)


def test_truncated_png_bytes(tiny_model):
    buf = io.BytesIO()
    textured_image(64, 64).save(buf, format="PNG")
    with pytest.raises(ImageError):
        tiny_model.generate(buf.getvalue()[:100], "q?", max_new_tokens=1)


def _truncate(folder, keep):
    shard = folder / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep(len(data))])


def _index_value(value):
    def damage(folder):
        index = _index(folder)
        index["weight_map"][next(iter(index["weight_map"]))] = value
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return damage


@pytest.mark.parametrize("damage,file,match", [
    (lambda f: _truncate(f, lambda n: n // 2), "model-00001-of-00003.safetensors", "not a readable safetensors file"),
    (lambda f: _truncate(f, lambda n: 20), "model-00001-of-00003.safetensors", "not a readable safetensors file"),
    (lambda f: _truncate(f, lambda n: 0), "model-00001-of-00003.safetensors", "not a readable safetensors file"),
    (lambda f: (f / "model.safetensors.index.json").write_text("[1]"), "model.safetensors.index.json",
     "expected a JSON object with a 'weight_map', got list"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": [1]}'), "model.safetensors.index.json",
     "'weight_map' should be an object"),
    (lambda f: (f / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}'),
     "model.safetensors.index.json", "expected UTF-8 JSON"),
    (_index_value("../outside.safetensors"), "", "model.safetensors.index.json weight_map['"),
    (_index_value("/etc/hostname"), "", "expected a file name inside the folder, got '/etc/hostname'"),
    (_index_value(3), "", "expected a file name inside the folder, got 3"),
    (lambda f: (f / "config.json").write_text("[1]"), "config.json", "expected a JSON object, got list"),
    (lambda f: (f / "config.json").write_bytes(b'{"hidden_size": "\xff"}'), "config.json", "not valid UTF-8 JSON"),
])
def test_damaged_checkpoints_name_the_file_and_key(tiny_ckpt, tmp_path, damage, file, match):
    folder = _copy(tiny_ckpt, tmp_path)
    damage(folder)
    with pytest.raises((CheckpointError, ConfigError)) as e:
        load_model(folder)
    message = str(e.value)
    assert message.startswith(str(folder / file)) and match in message and "\n" not in message, message


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", "abc", "'hidden_size' should be an integer, got 'abc'"),
    ("num_hidden_layers", 2.5, "'num_hidden_layers' should be an integer, got 2.5"),
    ("rms_norm_eps", "abc", "'rms_norm_eps' should be a number, got 'abc'"),
    ("rope_theta", "abc", "'rope_theta' should be a number"),
    ("mm_vision_select_layer", "abc", "'mm_vision_select_layer' should be an integer"),
    ("vis_token_granularity", "abc", "'vis_token_granularity' should be a list of token counts"),
    ("filtered_text_num", "abc", "'filtered_text_num' should be an integer"),
    ("router_token_cost", "abc", "'router_token_cost' should be a number"),
    ("router_select", "false", "'router_select' should be true or false"),
    ("image_mean", "abc", "'image_mean' should be a list"),
    ("mm_hidden_size", "abc", "'mm_hidden_size' should be an integer"),
    ("eos_token_id", ["x"], "'eos_token_id' should be an integer or a list of them"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tiny_ckpt, tmp_path, key, value, match):
    folder = _copy(tiny_ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: ") and match in str(e.value)


def test_shards_linked_from_elsewhere_load(tiny_ckpt, tmp_path):
    """The Hugging Face cache (and an editable install) link a checkpoint's files from
    another folder: the names in the index are inside, the files they lead to need not be."""
    folder = _copy(tiny_ckpt, tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    assert load_model(folder).config.has_router
