"""Names that several layers agree on: files, axes, graph tensors, the default system prompt.

Torch-free: the runtime imports this module.
"""

from __future__ import annotations

# --- files -------------------------------------------------------------------
CONFIG_FILE = "config.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_SINGLE_FILE = "model.safetensors"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# --- the model's fixed facts (AVG_LLAVA_SPEC.md) --------------------------------
DEFAULT_GRANULARITIES = (36, 72, 144, 288, 576)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (width, height)
DEFAULT_FILTERED_TEXT_NUM = 32
DEFAULT_ROUTER_HEADS = 8
# Where the router's text filter takes its candidates from (config.json
# "router_text_candidates", manifest router.text_from): runtime/chat.py router_text_ids.
ROUTER_TEXT_FROM_PROMPT, ROUTER_TEXT_FROM_QUESTION = "prompt", "question"
ROUTER_TEXT_FROM = (ROUTER_TEXT_FROM_PROMPT, ROUTER_TEXT_FROM_QUESTION)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PLACEHOLDER = "<image>"

# vicuna_v1, exactly (one line; not the older "curious human" v0 text).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# --- graph axes and tensor names (export specs and runtime checks use these) ----
AXIS_CROPS = "crops"
AXIS_SEQ = "seq_len"
AXIS_PAST = "past_len"
AXIS_TOTAL = "total_len"
AXIS_LOGITS = "n_logits"
AXIS_BATCH = "batch"         # requests in one decode step (the in-place cache decoder only)
DEFAULT_MAX_BATCH = 4        # avg-export build --max-batch: most requests one decode step takes


# --- build folder ----------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 6          # 2: tensor roles, a structured chat template; 3: kv_cache; 4: the router split;
                             # 5: router.text_from, router.alignment; 6: the in-place decoder's batch axis
# Older formats this version still reads: a format-5 build's decoder takes one request per
# call (no batch axis), which the runtime handles (DecoderRoles.max_batch is then 1).
MANIFEST_FORMATS_READ = (5, 6)
ROUTER_TEXT_FILE = "router_text.npz"   # the router's per-token table (runtime/router.py)
EMBED_TABLE_FILE = "embed_tokens.npy"
IMAGE_NEWLINE_FILE = "image_newline.npy"
TIMING_CACHE_FILE = "timing.cache"
REFERENCE_FILE = "reference.npz"     # reference outputs at the validation points (validation.py)


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"
