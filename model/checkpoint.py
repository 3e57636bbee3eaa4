"""Loading and saving checkpoints: local folders, safetensors only, strict names.

Layouts read:
  1. AVG-LLaVA (`llava_llama`): `model.vision_tower.vision_tower.vision_model.*`,
     `model.mm_projector.*`, `model.router.*`, `model.layers.*`, `lm_head.*`, ...
  2. AVG-LLaVA-Stage3: the same without `model.router.*`.
  3. Hugging Face LLaVA-NeXT (`llava_next`), transformers 4 or 5 names.
Saving writes layout 1 (plus `vision_config` in config.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from avg_edge import constants as C
from avg_edge.errors import CheckpointError
from avg_edge.manifest import inside
from avg_edge.model.config import AvgLlavaConfig
from avg_edge.model.llava import AvgLlavaModel
from avg_edge.runtime.tokenizer import load_tokenizer

# (checkpoint prefix, module prefix); the first match wins, the first per module
# prefix is the one `save_checkpoint` writes.
LLAVA_LLAMA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.clip."),
    ("model.vision_tower.vision_tower.", "vision_tower.clip."),  # transformers-5 CLIP names
    ("model.mm_projector.", "mm_projector."),
    ("model.image_newline", "image_newline"),
    ("model.router.", "router."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
LLAVA_NEXT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_model.", "vision_tower.clip."),          # transformers 4
    ("model.vision_tower.vision_model.", "vision_tower.clip."),
    ("model.vision_tower.", "vision_tower.clip."),                 # transformers 5
    ("vision_tower.", "vision_tower.clip."),                       # transformers 5 save_pretrained
    ("multi_modal_projector.linear_1.", "mm_projector.0."),
    ("multi_modal_projector.linear_2.", "mm_projector.2."),
    ("model.multi_modal_projector.linear_1.", "mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "mm_projector.2."),
    ("image_newline", "image_newline"),
    ("model.image_newline", "image_newline"),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Buffers some checkpoints carry that the model recomputes; they are not weights.
DERIVED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")


def rename_weight(name: str, layout: str) -> str | None:
    """The module name of a checkpoint tensor; None for derived buffers we drop.

    The one place where checkpoint names are mapped.  An unknown name comes back
    unchanged, so the strict check reports it as unexpected."""
    if name.endswith(DERIVED_SUFFIXES):
        return None
    table = LLAVA_NEXT_PREFIXES if layout == "llava_next" else LLAVA_LLAMA_PREFIXES
    for src, dst in table:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def _shard_map(folder: Path) -> dict[str, Path]:
    """checkpoint tensor name -> shard file, from the index or the single file."""
    index = folder / C.SAFETENSORS_INDEX_FILE
    if index.is_file():
        try:
            d = json.loads(index.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: expected UTF-8 JSON with a 'weight_map', got an unreadable file ({e})") from e
        if not isinstance(d, dict):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map', got {type(d).__name__}; "
                                  "copy the whole checkpoint folder")
        weight_map = d.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' should be an object of tensor name -> shard file, got "
                                  f"{weight_map!r:.60}; copy the whole checkpoint folder")
        shards = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                shards[shard] = inside(folder, shard, f"{C.SAFETENSORS_INDEX_FILE} weight_map[{name!r}]",
                                       CheckpointError, "copy the whole checkpoint folder", links_out=True)
        missing = sorted(s for s, p in shards.items() if not p.is_file())
        if missing:
            raise CheckpointError(
                f"{folder}: missing shard file(s) {missing} listed in {C.SAFETENSORS_INDEX_FILE} "
                f"({len(shards)} shards expected); copy the whole checkpoint folder"
            )
        return {name: shards[s] for name, s in weight_map.items()}
    single = folder / C.SAFETENSORS_SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{single}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                  "copy the checkpoint again") from e
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (f" Found {pickles}: pickle checkpoints are not loaded (unsafe); convert them to safetensors first."
            if pickles else "")
    raise CheckpointError(
        f"{folder}: no weights (expected {C.SAFETENSORS_INDEX_FILE} with shards, or {C.SAFETENSORS_SINGLE_FILE}).{hint}"
    )


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               only: tuple[str, ...] | None = None) -> AvgLlavaModel:
    """Load a checkpoint folder strictly: every weight present, none left over.

    The model is built on the meta device (no memory) and each weight goes from its shard
    straight into `dtype` (RoPE's inverse frequencies stay fp32, see AvgLlavaModel.cast_),
    so loading needs the model's size in `dtype` plus one tensor, never an fp32 copy.
    `only`: load just the weights whose module names start with these prefixes (the rest
    stay on the meta device; the names are still checked against the whole checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder} (expected a local checkpoint folder; there is no model hub here)")
    config = AvgLlavaConfig.from_folder(folder)
    tokenizer = load_tokenizer(folder)
    shard_of = _shard_map(folder)
    with torch.device("meta"):
        model = AvgLlavaModel(config, tokenizer=tokenizer)
    params = dict(model.named_parameters())

    renamed: dict[str, str] = {}  # module name -> checkpoint name
    for ck_name in shard_of:
        mod_name = rename_weight(ck_name, config.source_layout)
        if mod_name is not None:
            renamed[mod_name] = ck_name
    expected = set(params)
    if config.text.tie_word_embeddings:
        expected.discard("language_model.lm_head.weight")
    missing = sorted(expected - set(renamed))
    unexpected = sorted(renamed[m] for m in set(renamed) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s): {_name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} weight(s): {_name_list(unexpected)}")
        hint = ""
        if any(n.startswith("router.") for n in missing) and not any("router" in n for n in unexpected):
            hint = " Hint: config.json says router_select=true but the checkpoint has no router; set it to false for a Stage3 checkpoint."
        elif any(".router." in n for n in unexpected):
            hint = " Hint: the checkpoint has router weights but config.json lacks router_select=true."
        raise CheckpointError(f"{folder}: weights do not match the model ({config.source_layout} layout): " + "; ".join(parts) + "." + hint)

    by_shard: dict[Path, list[str]] = {}
    for mod_name, ck_name in renamed.items():
        if only is not None and not mod_name.startswith(only):
            continue
        by_shard.setdefault(shard_of[ck_name], []).append(mod_name)
    for shard, mod_names in sorted(by_shard.items()):
        try:
            with safe_open(str(shard), framework="pt") as f:
                available = set(f.keys())
                for mod_name in mod_names:
                    ck_name = renamed[mod_name]
                    if ck_name not in available:
                        raise CheckpointError(f"{shard}: index lists '{ck_name}' in this shard but the file lacks it")
                    t = f.get_tensor(ck_name)
                    if t.shape != params[mod_name].shape:
                        raise CheckpointError(
                            f"{shard}: '{ck_name}' has shape {tuple(t.shape)}, the config expects {tuple(params[mod_name].shape)}"
                        )
                    _assign(model, mod_name, t.to(dtype))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # a truncated or damaged shard
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                  "copy the checkpoint again") from e
    if config.text.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
    _materialize_buffers(model, check=only is None)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))


def _materialize_buffers(model: AvgLlavaModel, check: bool = True) -> None:
    """Buffers the model computes in __init__ (they were built on the meta device):
    RoPE's inverse frequencies (fp32) and CLIP's position ids."""
    rotary = model.language_model.model.rotary_emb
    with torch.device("cpu"):
        fresh = type(rotary)(rotary.config)
    for name, buf in fresh.named_buffers(recurse=False):
        setattr(rotary, name, buf)
    emb = model.vision_tower.clip.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if check and left:
        raise AssertionError(f"tensors left on the meta device after loading: {left[:5]}")


def checkpoint_name(mod_name: str) -> str:
    for src, dst in LLAVA_LLAMA_PREFIXES:
        if mod_name.startswith(dst):
            return src + mod_name[len(dst):]
    raise KeyError(mod_name)


def save_checkpoint(
    model: AvgLlavaModel,
    folder: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_files: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write layout 1 (sharded safetensors + index, config.json, tokenizer files).

    Written into a temporary sibling folder and renamed, so a crash leaves no half folder."""
    folder = Path(folder)
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; remove it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {checkpoint_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.text.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = state[name]
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / C.SAFETENSORS_INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / C.CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
        for f in tokenizer_files:
            shutil.copy(f, tmp / Path(f).name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
