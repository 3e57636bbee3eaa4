"""The torch-free runtime: image + question -> answer, through a build folder's graphs.

preprocess (AnyRes) -> vision graph (all granularities) -> router graph (or a fixed
granularity) -> pack ONLY the chosen granularity (one gather) -> prompt embeddings from
the table -> decoder prefill -> decode loop with the KV cache -> streamed text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import numpy as np

from avg_edge import constants as C
from avg_edge.errors import InputError
from avg_edge.export import specs as S
from avg_edge.export.manifest import Manifest, load_manifest
from avg_edge.runtime.backends.base import Backend, BackendError
from avg_edge.runtime.chat import prompt_ids
from avg_edge.runtime.image import load_image
from avg_edge.runtime.packing import gather_indices, visual_token_count
from avg_edge.runtime.preprocess import PreprocessConfig, preprocess_image
from avg_edge.runtime.sampling import SamplingParams, next_token
from avg_edge.runtime.tokenizer import JsonTokenizer, Tokenizer

log = logging.getLogger("avg_edge")
BACKENDS = ("auto", "ort", "trt")


@dataclass
class Timings:
    """Seconds unless named otherwise (the words llama.cpp and ollama print)."""

    load: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    router: float = 0.0
    prompt_eval: float = 0.0          # decoder prefill
    prompt_eval_count: int = 0        # tokens in the prefill (visual + text)
    eval: float = 0.0                 # decode steps after the first token
    eval_count: int = 0               # tokens generated
    time_to_first_token: float = 0.0  # from the call to the first token
    total: float = 0.0
    backend: float = 0.0              # time inside backend calls

    @property
    def prompt_eval_rate(self) -> float:
        return self.prompt_eval_count / self.prompt_eval if self.prompt_eval else 0.0

    @property
    def eval_rate(self) -> float:
        steps = max(self.eval_count - 1, 0)
        return steps / self.eval if self.eval else 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the call spent outside backend calls (Python, preprocessing, packing)."""
        return 1.0 - self.backend / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "prompt_eval_rate": self.prompt_eval_rate, "eval_rate": self.eval_rate,
                "overhead_share": self.overhead_share}


@dataclass
class Result:
    text: str
    token_ids: list[int]
    granularity: int
    router_logits: list[float] | None
    visual_tokens: int
    visual_tokens_full: int               # what the finest granularity would have cost
    router_probs: list[float] | None = None
    finish_reason: str = "stop"            # "stop" (</s>) or "length" (max_new_tokens or context)
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = self.timings.to_dict()
        return d


class TextStream:
    """Incremental detokenisation: decode the whole answer each step and emit what is new.
    Byte-fallback pieces (<0xNN>) are held back until a normal piece follows, because
    the decoder turns a run of bytes into characters only as a whole."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer.is_byte(token):
            return ""
        text = self.tokenizer.decode(self.ids).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever was held back (a trailing partial character) once the answer ends."""
        text = self.tokenizer.decode(self.ids).lstrip()
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


class Pipeline:
    """Core pipeline: no file or network I/O after construction (see `load`)."""

    def __init__(self, manifest: Manifest, backends: dict[str, Backend], tokenizer: Tokenizer,
                 embed_table: np.ndarray, image_newline: np.ndarray, load_seconds: float = 0.0) -> None:
        self.manifest = manifest
        self.backends = backends
        self.tokenizer = tokenizer
        self.embed_table = embed_table                    # [vocab, D]
        self.image_newline = image_newline                # [D]
        self.load_seconds = load_seconds
        self.dtype = np.dtype(manifest.spec(S.DECODER).inputs[0].dtype)
        self.preprocess_config = PreprocessConfig(
            crop_size=manifest.crop_size, pinpoints=tuple(tuple(p) for p in manifest.pinpoints),
            mean=tuple(manifest.image_mean), std=tuple(manifest.image_std))
        self.max_crops = manifest.spec(S.VISION).axes()[C.AXIS_CROPS].max
        self._said_no_router = False
        layers = (len(manifest.spec(S.DECODER).inputs) - 4) // 2
        self._kv_names = [pair for i in range(layers) for pair in (
            (C.past_key_name(i), C.present_key_name(i)), (C.past_value_name(i), C.present_value_name(i)))]

    # -- construction -----------------------------------------------------------------
    @classmethod
    def load(cls, build_dir: str | Path, backend: str = "auto", verify: bool = False, threads: int = 0,
             manifest: Manifest | None = None) -> "Pipeline":
        """Read a build folder; backend auto = TensorRT engines if the build has them and
        TensorRT runs here, else ONNX Runtime (which itself prefers GPU providers).
        `manifest` replaces the folder's manifest.json (used while a build is assembled)."""
        t0 = time.perf_counter()
        if backend not in BACKENDS:
            raise InputError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        folder = Path(build_dir)
        m = manifest if manifest is not None else load_manifest(folder, verify=verify)
        use_trt = backend == "trt" or (backend == "auto" and m.engines and _trt_usable())
        backends: dict[str, Backend] = {}
        for name in m.graphs:
            spec = m.spec(name)
            if use_trt:
                from avg_edge.runtime.backends.trt_backend import TrtBackend

                try:
                    if name not in m.engines:
                        raise BackendError(f"{folder}: no TensorRT engine for {name}; rebuild with avg-export build --backend trt")
                    backends[name] = TrtBackend(spec, folder / m.engines[name], m.tensorrt)
                    continue
                except BackendError as e:
                    if backend == "trt":
                        raise
                    log.warning("%s; using ONNX Runtime for %s", e, name)   # auto: never fail for want of an engine
            from avg_edge.runtime.backends.ort_backend import OrtBackend

            backends[name] = OrtBackend(spec, folder / spec.file, threads=threads)
        tok = JsonTokenizer(folder / C.TOKENIZER_JSON_FILE)
        table = np.load(folder / C.EMBED_TABLE_FILE, mmap_mode="r", allow_pickle=False)
        newline = np.load(folder / C.IMAGE_NEWLINE_FILE, allow_pickle=False)
        return cls(m, backends, tok, table, newline, time.perf_counter() - t0)

    @property
    def granularities(self) -> list[int]:
        return list(self.manifest.granularities)

    def describe_backend(self) -> str:
        return self.backends[S.DECODER].describe()

    # -- public calls -------------------------------------------------------------------
    def generate(self, image: Any, question: str, granularity: int | str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> Result:
        """The whole answer; `on_text` receives each piece as it is decoded."""
        run = self._run(image, question, granularity, max_new_tokens, SamplingParams(temperature, top_k, top_p, seed))
        while True:
            try:
                piece = next(run)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)

    def stream(self, image: Any, question: str, granularity: int | str | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> Iterator[str]:
        """Text pieces as they are decoded (the generator's return value is the Result)."""
        return self._run(image, question, granularity, max_new_tokens, SamplingParams(temperature, top_k, top_p, seed))

    # -- the pipeline -------------------------------------------------------------------
    def check_granularity(self, granularity: Any) -> int | None:
        if granularity is None or granularity == "auto":
            return None
        valid = self.granularities
        try:
            g = int(granularity)
        except (TypeError, ValueError):
            g = None
        if g not in valid or isinstance(granularity, bool) or isinstance(granularity, float):
            raise InputError(f"granularity: expected auto or one of {valid}, got {granularity!r}")
        return g

    def _run(self, image: Any, question: str, granularity: Any, max_new_tokens: int,
             sampling: SamplingParams) -> Generator[str, None, Result]:
        t_start = time.perf_counter()
        tm = Timings(load=self.load_seconds)
        for b in self.backends.values():
            b.total_inference_time = 0.0
        gran = self.check_granularity(granularity)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        m = self.manifest
        before, after = prompt_ids(self.tokenizer.encode, m.bos_token_id, question)

        t0 = time.perf_counter()
        pre = preprocess_image(load_image(image), self.preprocess_config)
        crops = pre.pixel_values.shape[0]
        if crops > self.max_crops:
            raise InputError(f"this image needs {crops} crops; the build accepts at most {self.max_crops} "
                             f"(rebuild with avg-export build --max-crops {crops})")
        tm.preprocess = time.perf_counter() - t0

        feats = self.backends[S.VISION].infer({"pixel_values": pre.pixel_values.astype(self.dtype)})
        tm.vision = self.backends[S.VISION].last_inference_time
        text = np.asarray(self.embed_table[np.asarray(before + after)], dtype=self.dtype)   # [T, D]
        chosen, logits, probs = self._choose(feats, text, gran)
        if logits is not None:
            tm.router = self.backends[S.ROUTER].last_inference_time

        d = m.hidden_size
        source = np.concatenate([feats[S.feature_name(chosen)].reshape(-1, d), self.image_newline.reshape(1, d).astype(self.dtype)])
        visual = source[gather_indices(chosen, pre.grid, pre.image_size)]                   # [V, D]
        embeds = np.concatenate([text[:len(before)], visual, text[len(before):]])[None]      # [1, N, D]
        n = embeds.shape[1]
        if n >= m.context_length:
            raise InputError(f"the prompt is {n} tokens ({visual.shape[0]} visual) but the build's context holds "
                             f"{m.context_length}; use a coarser --granularity or rebuild with a larger --max-context")
        full = visual_token_count(self.granularities[-1], pre.grid, pre.image_size)

        ids, finish = yield from self._decode(embeds, max_new_tokens, sampling, tm, t_start)
        tm.total = time.perf_counter() - t_start
        tm.backend = sum(b.total_inference_time for b in self.backends.values())
        return Result(text=self.tokenizer.decode(ids).strip(), token_ids=ids, granularity=chosen,
                      router_logits=None if logits is None else [float(x) for x in logits],
                      router_probs=None if probs is None else [float(x) for x in probs],
                      visual_tokens=int(visual.shape[0]), visual_tokens_full=int(full), finish_reason=finish,
                      timings=tm)

    def _choose(self, feats: dict[str, np.ndarray], text: np.ndarray, gran: int | None):
        if gran is not None:
            return gran, None, None
        if not self.manifest.has_router:
            if not self._said_no_router:
                log.warning("this build has no router: using the finest granularity %d", self.granularities[-1])
                self._said_no_router = True
            return self.granularities[-1], None, None
        out = self.backends[S.ROUTER].infer({**feats, "text_embeds": text})
        logits = out["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return self.granularities[int(np.argmax(logits))], logits, probs

    def _decode(self, embeds: np.ndarray, max_new_tokens: int, sampling: SamplingParams, tm: Timings,
                t_start: float) -> Generator[str, None, tuple[list[int], str]]:
        m = self.manifest
        dec = self.backends[S.DECODER]
        spec = dec.spec
        bound = getattr(dec, "infer_bound", None)
        n = embeds.shape[1]
        past = {t.name: np.zeros(spec.shape_of(t, {C.AXIS_PAST: 0}), dtype=t.dtype) for t in spec.inputs[4:]}
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None], "logit_positions": np.array([n - 1], np.int64), **past}
        spec.check_inputs(feeds)
        rng = np.random.default_rng(sampling.seed)
        stream = TextStream(self.tokenizer)
        ids: list[int] = []
        pos = n
        finish = "length"
        t0 = time.perf_counter()
        while True:
            out = bound(feeds, to_host=("logits",)) if bound else dec.infer(feeds, check=False)
            token = next_token(np.asarray(out["logits"])[0, -1], sampling, rng)
            if not ids:
                tm.prompt_eval = time.perf_counter() - t0
                tm.prompt_eval_count = n
                tm.time_to_first_token = time.perf_counter() - t_start
                t0 = time.perf_counter()
            if token == m.eos_token_id:
                finish = "stop"
                break
            ids.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if len(ids) >= min(max_new_tokens, m.context_length - n):   # same room as the reference
                break
            feeds = {"inputs_embeds": np.asarray(self.embed_table[[token]], dtype=self.dtype)[None],
                     "attention_mask": np.ones((1, pos + 1), np.int64), "position_ids": np.array([[pos]], np.int64),
                     "logit_positions": np.zeros(1, np.int64)}
            feeds.update({past_name: out[present_name] for past_name, present_name in self._kv_names})
            pos += 1
        rest = stream.flush()
        if rest:
            yield rest
        tm.eval = time.perf_counter() - t0 if ids else 0.0
        tm.eval_count = len(ids)
        return ids, finish


def _trt_usable() -> bool:
    from avg_edge.export.tensorrt_build import TensorRTUnavailable, probe

    try:
        probe()
        return True
    except TensorRTUnavailable:
        return False


__all__ = ["Pipeline", "Result", "Timings", "TextStream"]
