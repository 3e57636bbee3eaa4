"""tokenizer.json for the build: copied, or converted from sentencepiece and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

from avg_edge import constants as C
from avg_edge.errors import CheckpointError
from avg_edge.runtime.chat import DEFAULT_TEMPLATE
from avg_edge.runtime.tokenizer import JsonTokenizer, SentencePieceTokenizer

CHECK_QUESTIONS = (
    "What is in the picture?", "How many dots are there?\nAnswer with one word.",
    "Wie viele Punkte? héllo wörld 12345", "  two  spaces  ", "</s> <s> <unk> tricky ▁ marks",
)


def write_tokenizer_json(model_dir: Path, out: Path) -> str:
    """Put tokenizer.json at `out`; returns how (copied / converted)."""
    src = model_dir / C.TOKENIZER_JSON_FILE
    sp_path = model_dir / C.SENTENCEPIECE_FILE
    if src.is_file():
        shutil.copy(src, out)
        if sp_path.is_file():
            check_same_tokens(SentencePieceTokenizer(sp_path), JsonTokenizer(out))
            return "copied (checked identical to tokenizer.model)"
        return "copied"
    if not sp_path.is_file():
        raise CheckpointError(f"{model_dir}: no {C.TOKENIZER_JSON_FILE} or {C.SENTENCEPIECE_FILE}")
    # transformers' own sentencepiece -> tokenizers conversion, following the model's
    # normalizer settings (dummy prefix, whitespace escaping, byte fallback).
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    converted = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if converted is None:
        raise CheckpointError(f"{sp_path}: could not convert this sentencepiece model to tokenizer.json")
    converted.save(str(out))
    check_same_tokens(SentencePieceTokenizer(sp_path), JsonTokenizer(out))
    return "converted from tokenizer.model (checked identical)"


def check_same_tokens(reference, candidate) -> None:
    for q in CHECK_QUESTIONS:
        for chunk in DEFAULT_TEMPLATE.render([q]):
            a, b = reference.encode(chunk), candidate.encode(chunk)
            if a != b:
                raise CheckpointError(
                    f"tokenizer.json encodes {chunk[:40]!r} differently from tokenizer.model "
                    f"({b[:12]} vs {a[:12]}); the build would not match the model"
                )
            if candidate.decode(a) != reference.decode(a):
                raise CheckpointError(f"tokenizer.json decodes {chunk[:40]!r} differently from tokenizer.model")
