"""The torch-free runtime core: image + question -> answer through a build folder's graphs.

Steps, each usable on its own (calibration and the server use them):
  encode_image  preprocess (AnyRes) -> vision graph: every granularity's features
  prepare       router graph (or a fixed granularity) -> pack ONLY the chosen granularity
                (one gather) -> prompt embeddings from the table, around the image
  score         teacher-forced mean NLL of an answer after a prepared prompt
  decode        prefill + KV-cache decode loop -> token ids
and on top: `stream` (text pieces, then `.result`) and `generate` (the whole Result).
No file or network I/O happens after `Pipeline.load`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge.errors import InputError, LimitError
from avg_edge.manifest import Manifest, inside, load_manifest
from avg_edge.runtime.backends import Backend, open_backends
from avg_edge.runtime.chat import ChatTemplate, prompt_ids, router_text_ids
from avg_edge.runtime.image import load_image
from avg_edge.runtime.packing import gather_indices, visual_token_count
from avg_edge.runtime.image import warm_up_image_decoders
from avg_edge.runtime.router import RouterText
from avg_edge.runtime.preprocess import PreprocessConfig, PreprocessedImage, preprocess_image
from avg_edge.runtime.sampling import SamplingParams, next_token
from avg_edge.runtime.text import StopText, TextStream
from avg_edge.runtime.tokenizer import JsonTokenizer, Tokenizer

log = logging.getLogger("avg_edge")


@dataclass
class Timings:
    """Seconds unless named otherwise (the words llama.cpp and ollama print)."""

    load: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    router: float = 0.0
    prompt_eval: float = 0.0          # decoder prefill
    prompt_eval_count: int = 0        # tokens in the prompt (visual + text)
    prompt_cached_count: int = 0      # of those, kept from a slot's previous request, not prefilled (avg-serve)
    eval: float = 0.0                 # decode steps after the first token
    eval_count: int = 0               # tokens generated
    time_to_first_token: float = 0.0  # from the call to the first token
    total: float = 0.0
    backend: float = 0.0              # time inside backend calls

    @property
    def prompt_eval_rate(self) -> float:
        return (self.prompt_eval_count - self.prompt_cached_count) / self.prompt_eval if self.prompt_eval else 0.0

    @property
    def eval_rate(self) -> float:
        steps = max(self.eval_count - 1, 0)
        return steps / self.eval if self.eval else 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the call spent outside backend calls (Python, preprocessing, packing)."""
        return 1.0 - self.backend / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}     # asdict would deep-copy every float
        return {**d, "prompt_eval_rate": self.prompt_eval_rate, "eval_rate": self.eval_rate,
                "overhead_share": self.overhead_share}


@dataclass
class Result:
    """One answer; the PyTorch reference returns the same type."""

    text: str
    token_ids: list[int]
    granularity: int | None               # None: a text-only prompt (no image)
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


@dataclass
class EncodedImage:
    """An image after preprocessing and the vision graph."""

    image: PreprocessedImage
    features: dict[str, np.ndarray]        # feature_name(g) -> [crops, g, D]
    preprocess_seconds: float = 0.0
    vision_seconds: float = 0.0
    # The router graph's outputs for this image (image votes, text direction), kept by the
    # first question the router answers so that follow-up questions skip the graph.
    router_image: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Prepared:
    """Everything between the image and the decoder for one question."""

    embeds: np.ndarray                     # [1, N, D] prompt before | visual tokens | prompt after
    granularity: int | None                # None: a text-only prompt
    router_logits: np.ndarray | None       # [n_granularities]
    visual_tokens: int
    visual_tokens_full: int
    ids_before: list[int]
    ids_after: list[int]
    timings: Timings

    @property
    def router_probs(self) -> np.ndarray | None:
        if self.router_logits is None:
            return None
        p = np.exp(self.router_logits - self.router_logits.max())
        return p / p.sum()


class Pipeline:
    """The core pipeline over one build's backends, tokenizer and tables."""

    def __init__(self, manifest: Manifest, backends: dict[str, Backend], tokenizer: Tokenizer,
                 embed_table: np.ndarray, image_newline: np.ndarray, load_seconds: float = 0.0,
                 router_text: RouterText | None = None) -> None:
        if manifest.has_router and router_text is None:
            raise InputError("this build has a router: Pipeline needs its RouterText (Pipeline.load reads it)")
        self.manifest = manifest
        self.router_text = router_text
        self.backends = dict(backends)
        self.tokenizer = tokenizer
        self.embed_table = embed_table                    # [vocab, D]
        self.image_newline = image_newline                # [D]
        self.load_seconds = load_seconds
        self.template = ChatTemplate.from_dict(manifest.chat_template)
        self.decoder_roles = S.DecoderRoles(manifest.spec(S.DECODER))
        self.dtype = self.decoder_roles.dtype
        self.preprocess_config = PreprocessConfig(
            crop_size=manifest.crop_size, pinpoints=tuple(tuple(p) for p in manifest.pinpoints),
            mean=tuple(manifest.image_mean), std=tuple(manifest.image_std))
        self.max_crops = manifest.spec(S.VISION).axes()[C.AXIS_CROPS].max
        self.max_logits = manifest.spec(S.DECODER).axes()[C.AXIS_LOGITS].max
        self._newline_row = np.asarray(image_newline, dtype=self.dtype).reshape(1, -1)
        self._said_no_router = False

    @classmethod
    def load(cls, build_dir: str | Path, backend: str = "auto", verify: bool = False, threads: int = 0,
             manifest: Manifest | None = None, backends: dict[str, Backend] | None = None) -> "Pipeline":
        """Open a build folder (see `runtime.backends` for what `backend` picks).
        `manifest` replaces the folder's manifest.json (while a build is assembled);
        `backends` gives some graphs' backends ready-made (a Triton model called through
        BLS); the others are opened from the folder."""
        t0 = time.perf_counter()
        folder = Path(build_dir)
        m = manifest if manifest is not None else load_manifest(folder, verify=verify)
        given = dict(backends or {})
        backends = given | open_backends(folder, m, backend, threads, skip=tuple(given))
        try:
            tok = JsonTokenizer(inside(folder, C.TOKENIZER_JSON_FILE, "tokenizer"))
            table = _load_table(inside(folder, C.EMBED_TABLE_FILE, "table"), mmap=True)
            newline = _load_table(inside(folder, C.IMAGE_NEWLINE_FILE, "table"), mmap=False)
            router_text = None
            if m.has_router:
                router_text = RouterText.load(inside(folder, m.router["text_file"], "router table"),
                                              granularities=len(m.granularities), vocab=table.shape[0],
                                              k=m.router["text_candidates"])
        except BaseException:
            for b in backends.values():
                b.close()
            raise
        warm_up_image_decoders()
        return cls(m, backends, tok, table, newline, time.perf_counter() - t0, router_text)

    def with_backends(self, backends: dict[str, Backend]) -> "Pipeline":
        """The same build with other backends (e.g. wrappers that record what each graph sees)."""
        return Pipeline(self.manifest, backends, self.tokenizer, self.embed_table, self.image_newline, self.load_seconds,
                        self.router_text)

    @property
    def granularities(self) -> list[int]:
        return list(self.manifest.granularities)

    def describe_backend(self) -> str:
        return self.backends[S.DECODER].describe()

    def close(self) -> None:
        for b in self.backends.values():
            b.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- checks ----------------------------------------------------------------------------
    def check_granularity(self, granularity: Any) -> int | None:
        """None / "auto" (the router chooses) or one of the build's granularities."""
        if granularity is None or granularity == "auto":
            return None
        valid = self.granularities
        if isinstance(granularity, (bool, float)) or not isinstance(granularity, (int, np.integer)) \
                or int(granularity) not in valid:
            raise InputError(f"granularity: expected auto or one of {valid}, got {granularity!r}")
        return int(granularity)

    # -- steps -----------------------------------------------------------------------------
    def encode_image(self, image: Any) -> EncodedImage:
        """Preprocess and run the vision graph (all granularities)."""
        t0 = time.perf_counter()
        pre = preprocess_image(load_image(image), self.preprocess_config)
        crops = pre.pixel_values.shape[0]
        if crops > self.max_crops:
            raise LimitError(f"this image needs {crops} crops; the build accepts at most {self.max_crops} "
                             f"(rebuild with avg-export build --max-crops {crops})")
        t_pre = time.perf_counter() - t0
        vision = self.backends[S.VISION]
        feats = vision.infer({"pixel_values": pre.pixel_values.astype(self.dtype, copy=False)})   # fp32 builds: no copy
        return EncodedImage(pre, feats, t_pre, vision.last_inference_time)

    def check_max_visual_tokens(self, max_visual_tokens: Any) -> int | None:
        """None (no budget) or a positive integer."""
        if max_visual_tokens is None:
            return None
        if isinstance(max_visual_tokens, (bool, float)) or not isinstance(max_visual_tokens, (int, np.integer)) \
                or int(max_visual_tokens) < 1:
            raise InputError(f"max_visual_tokens: expected a positive integer (visual tokens for the whole image), "
                             f"got {max_visual_tokens!r}")
        return int(max_visual_tokens)

    def visual_token_counts(self, enc: EncodedImage) -> dict[int, int]:
        """Visual tokens this image costs at each granularity (all crops, newlines included)."""
        pre = enc.image
        return {g: visual_token_count(g, pre.grid, pre.image_size) for g in self.granularities}

    def prepare(self, image: Any, question: str, granularity: Any = None, max_visual_tokens: Any = None, *,
                history: Sequence[str] = (), system: str | None = None, image_turn: int = 0) -> Prepared:
        """Router (or a fixed granularity), packing and prompt embeddings: [1, N, D].
        `max_visual_tokens`: the router's best granularity among those whose visual tokens
        for this image fit the budget (without a router: the finest that fits).

        A conversation: `history` holds the earlier turns (user, assistant, ...), `question`
        is the last user turn, the image opens user turn `image_turn` and `system` replaces
        the template's system prompt.  `image` None: a text-only prompt (no vision, no
        router; the plain language model)."""
        turns = [*history, question]
        if image is None:
            if granularity not in (None, "auto") or max_visual_tokens is not None:
                raise InputError("granularity and max_visual_tokens choose visual tokens: a request without an image "
                                 "has none (send an image, or leave them out)")
            return self._prepare_text(turns, system)
        gran = self.check_granularity(granularity)
        budget = self.check_max_visual_tokens(max_visual_tokens)
        before_text, after_text = self.template.render(turns, system, image_turn=image_turn)   # bad turns fail first
        enc = image if isinstance(image, EncodedImage) else self.encode_image(image)
        allowed = None
        if budget is not None:
            counts = self.visual_token_counts(enc)
            allowed = [g for g in self.granularities if counts[g] <= budget]
            if not allowed:
                raise LimitError(f"max_visual_tokens: {budget} visual tokens fit no granularity for this image "
                                 f"(visual tokens per granularity: {counts}); raise the budget")
            if gran is not None and gran not in allowed:
                raise LimitError(f"max_visual_tokens: granularity {gran} needs {counts[gran]} visual tokens for this "
                                 f"image, over the budget of {budget} (per granularity: {counts}); drop -g or raise "
                                 "the budget")
        before, after = prompt_ids(self.tokenizer.encode, self.manifest.bos_token_id, before_text, after_text)
        tm = Timings(preprocess=enc.preprocess_seconds, vision=enc.vision_seconds)
        ids = np.asarray(before + after)
        text = np.asarray(self.embed_table[ids], dtype=self.dtype)                               # [T, D]
        chosen, logits = self._choose(enc, question, before, after, gran, tm, allowed)
        d = self.manifest.hidden_size
        source = np.concatenate([enc.features[S.feature_name(chosen)].reshape(-1, d), self._newline_row])
        pre = enc.image
        visual = source[gather_indices(chosen, pre.grid, pre.image_size)]                         # [V, D]
        embeds = np.concatenate([text[:len(before)], visual, text[len(before):]])[None]           # [1, N, D]
        self._check_context(embeds.shape[1], f" ({visual.shape[0]} visual)",
                            "use a coarser granularity, a shorter conversation or rebuild with a larger --max-context")
        full = visual_token_count(self.granularities[-1], pre.grid, pre.image_size)
        return Prepared(embeds, chosen, logits, int(visual.shape[0]), int(full), before, after, tm)

    def _prepare_text(self, turns: list[str], system: str | None) -> Prepared:
        """A prompt without an image: the template's turns, embedded, nothing visual."""
        text, _ = self.template.render(turns, system, image=False)
        ids, _ = prompt_ids(self.tokenizer.encode, self.manifest.bos_token_id, text, "")
        self._check_context(len(ids), "", "shorten the conversation or rebuild with a larger --max-context")
        embeds = np.asarray(self.embed_table[np.asarray(ids)], dtype=self.dtype)[None]            # [1, N, D]
        return Prepared(embeds, None, None, 0, 0, ids, [], Timings())

    def _check_context(self, n: int, detail: str, hint: str) -> None:
        ctx = self.manifest.context_length
        if n >= ctx:
            raise LimitError(f"the prompt is {n} tokens{detail} but the build's context holds {ctx}; {hint}")

    def router_ids(self, question: str, before: list[int], after: list[int]) -> list[int]:
        """The prompt token ids the router's text filter chooses from (manifest router.text_from)."""
        return router_text_ids(self.manifest.router["text_from"], before, after, self.tokenizer.encode(question))

    def _choose(self, enc: EncodedImage, question: str, before: list[int], after: list[int], gran: int | None,
                tm: Timings, allowed: list[int] | None = None) -> tuple[int, np.ndarray | None]:
        """A fixed granularity, or the router's best-scoring one among `allowed` (all if None)."""
        if gran is not None:
            return gran, None
        allowed = self.granularities if allowed is None else allowed
        if not self.manifest.has_router:
            if not self._said_no_router:
                log.warning("this build has no router: using the finest granularity %d", self.granularities[-1])
                self._said_no_router = True
            return allowed[-1], None
        t0 = time.perf_counter()
        if enc.router_image is None:
            router = self.backends[S.ROUTER]
            out = router.infer({name: enc.features[name] for name in router.spec.input_names})
            enc.router_image = (out[router.spec.name_of(S.ROUTER_IMAGE_VOTES)],
                                out[router.spec.name_of(S.ROUTER_TEXT_DIRECTION)])
        ids = np.asarray(self.router_ids(question, before, after), dtype=np.int64)
        logits = self.router_text.logits(*enc.router_image, ids, self.embed_table[ids])
        tm.router = time.perf_counter() - t0
        best = max(allowed, key=lambda g: logits[self.granularities.index(g)])
        return best, logits

    def score(self, prepared: Prepared, answer_ids: list[int]) -> float:
        """Mean negative log-likelihood of `answer_ids` after the prompt, teacher-forced in
        one prefill (the decoder returns logits only at the answer's positions)."""
        if not answer_ids:
            raise InputError("answer: expected at least one token to score")
        if len(answer_ids) > self.max_logits:
            raise LimitError(f"answer: {len(answer_ids)} tokens; this build scores at most {self.max_logits}")
        prompt = prepared.embeds[0]
        emb = np.concatenate([prompt, np.asarray(self.embed_table[answer_ids[:-1]], dtype=self.dtype)])[None]
        if emb.shape[1] > self.manifest.context_length:
            raise LimitError(f"prompt and answer are {emb.shape[1]} tokens; the build's context holds "
                             f"{self.manifest.context_length}")
        first = prompt.shape[0] - 1                                     # this position predicts answer[0]
        feeds = self.decoder_roles.prefill_feeds(emb, np.arange(first, first + len(answer_ids)))
        logits = self.decoder_roles.logits(self.backends[S.DECODER].infer(feeds))[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return -float(np.mean(logp[np.arange(len(answer_ids)), answer_ids]))

    def decode(self, prepared: Prepared, max_new_tokens: int = 256,
               sampling: SamplingParams | None = None) -> "TokenStream":
        """Prefill, then one decoder step per token: an iterator of token ids (</s> excluded)."""
        return TokenStream(self, prepared, _check_max_new_tokens(max_new_tokens), sampling or SamplingParams())

    # -- on top ----------------------------------------------------------------------------
    def stream(self, image: Any, question: str, granularity: Any = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, max_visual_tokens: int | None = None, *, history: Sequence[str] = (),
               system: str | None = None, image_turn: int = 0, stop: Sequence[str] = ()) -> "Generation":
        """Text pieces as they are decoded; the Result is `.result` once it is exhausted.
        `history`, `system`, `image_turn` as in `prepare`; `stop`: strings that end the
        answer where they first appear (not included)."""
        t_start = time.perf_counter()
        for b in self.backends.values():
            b.total_inference_time = 0.0
        sampling = SamplingParams(temperature, top_k, top_p, seed)        # bad settings fail before any work
        _check_max_new_tokens(max_new_tokens)
        stops = check_stop(stop)
        prepared = self.prepare(image, question, granularity, max_visual_tokens, history=history, system=system,
                                image_turn=image_turn)
        return Generation(self, prepared, self.decode(prepared, max_new_tokens, sampling), t_start, stops)

    def generate(self, image: Any, question: str, granularity: Any = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 max_visual_tokens: int | None = None, **conversation: Any) -> Result:
        """The whole answer; `on_text` receives each piece as it is decoded; `conversation`:
        `stream`'s history, system, image_turn and stop."""
        gen = self.stream(image, question, granularity, max_new_tokens, temperature, top_k, top_p, seed,
                          max_visual_tokens, **conversation)
        for piece in gen:
            if on_text is not None:
                on_text(piece)
        return gen.result


def check_stop(stop: Any) -> tuple[str, ...]:
    """OpenAI's `stop`: None, a string or a list of at most 4 non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise InputError(f"stop: expected a string or a list of up to 4 non-empty strings, got {stop!r:.80}")
    return tuple(items)


class TokenStream:
    """Token ids from the decoder, one per step.  After the last one, `finish_reason` is
    "stop" (</s>) or "length", and the prefill / decode seconds are filled in."""

    def __init__(self, pipe: Pipeline, prepared: Prepared, max_new_tokens: int, sampling: SamplingParams) -> None:
        self.pipe, self.prepared, self.sampling = pipe, prepared, sampling
        n = prepared.embeds.shape[1]
        self.room = min(max_new_tokens, pipe.manifest.context_length - n)   # same room as the reference
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0
        self.first_token_at = 0.0           # perf_counter() when the first token was known
        self.decode_seconds = 0.0
        self.count = 0
        self._tokens = self._run()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    def close(self) -> None:
        self._tokens.close()

    def _run(self) -> Iterator[int]:
        pipe, roles = self.pipe, self.pipe.decoder_roles
        dec = pipe.backends[S.DECODER]
        eos = pipe.manifest.eos_token_id
        logits_name = roles.name(S.LOGITS)
        aliases = roles.aliases()           # in place: each present is written into its past's buffer
        cache = roles.new_cache(dec.allocate if aliases else None)
        feeds = roles.prefill_feeds(self.prepared.embeds, cache=cache)
        dec.spec.check_inputs(feeds, trusted=frozenset(cache) if aliases else frozenset())
        rng = np.random.default_rng(self.sampling.seed)
        pos = self.prepared.embeds.shape[1]
        t0 = time.perf_counter()
        out = dec.infer_kv(feeds, (logits_name,), aliases)                    # prefill
        self.first_token_at = time.perf_counter()
        self.prefill_seconds = self.first_token_at - t0
        t0 = self.first_token_at
        try:
            while True:
                token = next_token(np.asarray(out[logits_name])[0, -1], self.sampling, rng)
                if token == eos:
                    self.finish_reason = "stop"
                    break
                self.count += 1
                yield token
                if self.count >= self.room:
                    self.finish_reason = "length"
                    break
                embed = np.asarray(pipe.embed_table[[token]], dtype=pipe.dtype)[None]
                out = dec.infer_kv(roles.step_feeds(embed, pos, roles.next_past(out)), (logits_name,), aliases)
                pos += 1
        finally:                            # also when closed early (a stop sequence, a cancelled request)
            self.decode_seconds = time.perf_counter() - t0 if self.count else 0.0


class Generation:
    """An answer being generated: iterate for text pieces; `result` is set once the
    iterator is exhausted (None before)."""

    def __init__(self, pipe: Pipeline, prepared: Prepared, tokens: TokenStream, t_start: float,
                 stop: tuple[str, ...] = ()) -> None:
        self.pipe, self.prepared, self.tokens, self.t_start = pipe, prepared, tokens, t_start
        self.stop = stop
        self.result: Result | None = None
        self._pieces = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early (the decoder loop ends at the next step); `result` stays None."""
        self._pieces.close()
        self.tokens.close()

    def _run(self) -> Iterator[str]:
        text, stops = TextStream(self.pipe.tokenizer), StopText(self.stop)
        ids: list[int] = []
        said: list[str] = []
        for token in self.tokens:
            ids.append(token)
            piece = stops.push(text.push(token))
            if piece:
                said.append(piece)
                yield piece
            if stops.stopped:
                self.tokens.close()
                break
        rest = stops.push(text.flush()) + stops.flush()
        if rest:
            said.append(rest)
            yield rest
        tk, p = self.tokens, self.prepared
        finish = "stop" if stops.stopped else (tk.finish_reason or "length")
        tm = replace(p.timings, load=self.pipe.load_seconds, prompt_eval=tk.prefill_seconds,
                     prompt_eval_count=p.embeds.shape[1], eval=tk.decode_seconds, eval_count=len(ids),
                     time_to_first_token=tk.first_token_at - self.t_start if tk.first_token_at else 0.0)
        tm.total = time.perf_counter() - self.t_start
        tm.backend = sum(b.total_inference_time for b in self.pipe.backends.values())
        self.result = result_of(self.pipe, p, ids, finish, tm, text="".join(said) if stops.stopped else None)


def result_of(pipe: Pipeline, prepared: Prepared, ids: list[int], finish_reason: str, timings: Timings,
              text: str | None = None) -> Result:
    """The Result of an answer (Generation's, or one decoded in runtime/slots.py): the
    text (`ids` decoded, or `text` when a stop sequence cut it), the router's choice and
    the given timings."""
    p, probs = prepared, prepared.router_probs
    return Result(text=(pipe.tokenizer.decode(ids) if text is None else text).strip(), token_ids=list(ids),
                  granularity=p.granularity,
                  router_logits=None if p.router_logits is None else [float(x) for x in p.router_logits],
                  router_probs=None if probs is None else [float(x) for x in probs],
                  visual_tokens=p.visual_tokens, visual_tokens_full=p.visual_tokens_full,
                  finish_reason=finish_reason, timings=timings)


def _check_max_new_tokens(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"max_new_tokens: expected a positive integer, got {n!r}")
    return n


def _load_table(path: Path, mmap: bool) -> np.ndarray:
    from avg_edge.errors import BuildFolderError

    try:
        table = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        # A plain ndarray over the same mapped pages: indexing a np.memmap builds memmap
        # objects (its __getitem__ and __array_finalize__ were 8% of the server's scheduler
        # thread, one lookup per decoded token).
        return table.view(np.ndarray)
    except (ValueError, OSError, EOFError) as e:
        # numpy's own text for an object array suggests loading with pickle: never done here.
        why = "it holds Python objects, not numbers" if "allow_pickle" in str(e) else str(e)
        raise BuildFolderError(f"{path}: not a readable .npy table ({why}); rebuild with avg-export build") from e


__all__ = ["Pipeline", "Result", "Timings", "EncodedImage", "Prepared", "TokenStream", "Generation"]
