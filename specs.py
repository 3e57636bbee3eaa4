"""One declarative spec per graph: I/O names, dtypes, named axes with min/opt/max, and
each tensor's role ("past key of layer i").

The exporter's dynamic shapes and dummy inputs, the validation points, the TensorRT
optimisation profiles, the runtime's input checks, `avg-export inspect` and README's
I/O tables all come from here; the decoder's KV convention lives only in
`DecoderRoles`.  Part of the build-folder contract (the manifest stores the specs);
torch-free.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np

from avg_edge import constants as C
from avg_edge.errors import InputError

VISION, ROUTER, DECODER = "vision", "router", "decoder"
GRAPHS = (VISION, ROUTER, DECODER)
SCORING_LOGITS = 256      # most positions whose logits one prefill returns

# Tensor roles.  KV roles carry the layer in TensorSpec.layer.
PIXEL_VALUES, FEATURES = "pixel_values", "features"
# The router graph's outputs (its text part is a table, see model/router.py and runtime/router.py).
ROUTER_IMAGE_VOTES, ROUTER_TEXT_DIRECTION = "router_image_votes", "router_text_direction"
INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, LOGIT_POSITIONS = "inputs_embeds", "attention_mask", "position_ids", "logit_positions"
PAST_LENGTH = "past_length"          # in-place cache: how many cache rows are valid before this call
KV_CACHES = ("concat", "inplace")
# The in-place cache's operators (manifest cache_op): gqa, ONNX Runtime's
# com.microsoft.GroupQueryAttention; tensorscatter, standard TensorScatter + Attention,
# which exist from opset 24 and which TensorRT 10.15+ runs in place.
CACHE_OPS = ("gqa", "tensorscatter")
CACHE_OP_OPSET = {"tensorscatter": 24}
PAST_KEY, PAST_VALUE, LOGITS, PRESENT_KEY, PRESENT_VALUE = "past_key", "past_value", "logits", "present_key", "present_value"


@dataclass(frozen=True)
class Axis:
    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"axis {self.name}: expected 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[Any, ...]     # ints (fixed) and axis names (dynamic)
    role: str = ""             # what the tensor is (see the role constants above)
    layer: int | None = None   # decoder layer of a KV tensor


@dataclass(frozen=True)
class Profile:
    """A set of axis bounds valid together (a TensorRT optimisation profile)."""

    name: str
    axes: dict[str, Axis]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    file: str = ""

    def __post_init__(self) -> None:
        if not self.file:
            object.__setattr__(self, "file", f"{self.name}.onnx")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def name_of(self, role: str) -> str:
        """The name of the one tensor with `role` (roles without a layer)."""
        names = [t.name for t in (*self.inputs, *self.outputs) if t.role == role and t.layer is None]
        if len(names) != 1:
            raise InputError(f"{self.name}: expected one tensor with role {role!r}, found {names}")
        return names[0]

    @cached_property
    def _checks(self) -> tuple[tuple[str, ...], dict[str, Axis], tuple[tuple[TensorSpec, np.dtype], ...]]:
        """What check_inputs compares against, made once (it runs on every prefill)."""
        return tuple(self.input_names), self.axes(), tuple((t, np.dtype(t.dtype)) for t in self.inputs)

    def axes(self) -> dict[str, Axis]:
        """Every axis at its widest bounds over all profiles."""
        out: dict[str, Axis] = {}
        for p in self.profiles:
            for a in p.axes.values():
                if a.name in out:
                    o = out[a.name]
                    a = Axis(a.name, min(o.min, a.min), o.opt, max(o.max, a.max))
                out[a.name] = a
        return out

    def shape_of(self, t: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in t.shape)

    def profile_shapes(self, profile: Profile) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes, as TensorRT's set_shape wants them."""
        out = {}
        for t in self.inputs:
            out[t.name] = tuple(
                self.shape_of(t, {n: getattr(a, which) for n, a in profile.axes.items()})
                for which in ("min", "opt", "max")
            )
        return out

    def check_inputs(self, feeds: dict[str, Any], trusted: frozenset[str] = frozenset()) -> None:
        """Names, dtypes, fixed sizes and axis bounds; consistent axis values across inputs.
        `trusted` inputs are only checked for presence (buffers a backend made itself)."""
        names, axes, inputs = self._checks
        if len(feeds) != len(names) or any(n not in feeds for n in names):
            missing = [n for n in names if n not in feeds]
            extra = [n for n in feeds if n not in names]
            raise InputError(f"{self.name}: expected inputs {list(names)}, missing {missing}, unexpected {extra}")
        seen: dict[str, int] = {}
        for t, dtype in inputs:
            if t.name in trusted:
                continue
            arr = feeds[t.name]
            if arr.dtype != dtype:
                raise InputError(f"{self.name}.{t.name}: expected dtype {t.dtype}, got {arr.dtype}")
            if len(arr.shape) != len(t.shape):
                raise InputError(f"{self.name}.{t.name}: expected shape {list(t.shape)}, got {list(arr.shape)}")
            for d, n in zip(t.shape, arr.shape):
                if isinstance(d, int):
                    if d != n:
                        raise InputError(f"{self.name}.{t.name}: expected shape {list(t.shape)}, got {list(arr.shape)}")
                    continue
                a = axes[d]
                if not a.min <= n <= a.max:
                    raise InputError(f"{self.name}.{t.name}: axis '{d}' expected {a.min}..{a.max}, got {n}")
                if seen.setdefault(d, n) != n:
                    raise InputError(f"{self.name}.{t.name}: axis '{d}' is {n} here but {seen[d]} in another input")
        for total, parts in DERIVED_AXES.items():
            if total in seen and all(p in seen for p in parts) and seen[total] != sum(seen[p] for p in parts):
                raise InputError(f"{self.name}: axis '{total}' is {seen[total]}, expected "
                                 + " + ".join(f"{p} ({seen[p]})" for p in parts))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        def ts(x: dict) -> TensorSpec:
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]), x.get("role", ""), x.get("layer"))

        return cls(
            name=d["name"],
            inputs=tuple(ts(x) for x in d["inputs"]),
            outputs=tuple(ts(x) for x in d["outputs"]),
            profiles=tuple(Profile(p["name"], {k: Axis(**a) for k, a in p["axes"].items()}) for p in d["profiles"]),
            file=d["file"],
        )

    def io_table(self) -> list[tuple[str, str, str, str]]:
        """(direction, name, dtype, shape with bounds) rows for README and `inspect`."""
        axes = self.axes()
        rows = []
        for direction, tensors in (("in", self.inputs), ("out", self.outputs)):
            for t in tensors:
                dims = [str(d) if isinstance(d, int) else f"{d}[{axes[d].min}..{axes[d].max}]" if d in axes else d for d in t.shape]
                rows.append((direction, t.name, t.dtype, "[" + ", ".join(dims) + "]"))
        return rows


def markdown_io_table(spec: GraphSpec) -> str:
    """The graph's I/O as a markdown table (README), straight from the spec; per-layer
    KV tensors are shown once with `{i}`."""
    rows = ["| | name | dtype | shape |", "|---|---|---|---|"]
    for direction, name, dtype, shape in spec.io_table():
        name = re.sub(r"^(past_key_values|present)\.\d+\.", r"\1.{i}.", name)
        row = f"| {direction} | `{name}` | {dtype} | `{shape}` |"
        if row not in rows:
            rows.append(row)
    profiles = "; ".join(f"{p.name}: " + ", ".join(f"{a.name} {a.min}/{a.opt}/{a.max}" for a in p.axes.values())
                         for p in spec.profiles)
    return "\n".join(rows) + f"\n\nProfiles (min/opt/max): {profiles}.\n"


@dataclass(frozen=True)
class KVPair:
    """One cache tensor of one layer: what the decoder reads (past) and returns (present)."""

    layer: int
    past: str
    present: str


@dataclass(frozen=True)
class DecoderRoles:
    """The decoder's I/O by role: the one place that knows the KV convention.  Builds the
    feeds of an empty past, a prefill and a decode step, and maps presents to pasts."""

    spec: GraphSpec

    @cached_property
    def _by_role(self) -> dict[tuple[str, int | None], TensorSpec]:
        return {(t.role, t.layer): t for t in (*self.spec.inputs, *self.spec.outputs)}

    def name(self, role: str, layer: int | None = None) -> str:
        try:
            return self._by_role[(role, layer)].name
        except KeyError:
            raise InputError(f"{self.spec.name}: no tensor with role {role!r}"
                             + ("" if layer is None else f" for layer {layer}")) from None

    @cached_property
    def kv(self) -> tuple[KVPair, ...]:
        """Every past/present pair, in the graph's input order."""
        out = []
        for t in self.spec.inputs:
            if t.role in (PAST_KEY, PAST_VALUE):
                present = PRESENT_KEY if t.role == PAST_KEY else PRESENT_VALUE
                out.append(KVPair(t.layer, t.name, self.name(present, t.layer)))
        return tuple(out)

    @property
    def layers(self) -> int:
        return len({p.layer for p in self.kv})

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the embeddings the decoder takes (the build's float type)."""
        return np.dtype(self._by_role[(INPUTS_EMBEDS, None)].dtype)

    @cached_property
    def max_batch(self) -> int:
        """Most requests one decode step takes: the batch axis's max; 1 when the decoder
        has no batch axis (the concat cache, builds before manifest format 6, --max-batch 1)."""
        axis = self.spec.axes().get(C.AXIS_BATCH)
        return axis.max if axis is not None else 1

    @cached_property
    def kind(self) -> str:
        """"inplace": a fixed-capacity cache that the graph updates in place (bound as both
        past and present); "concat": the graph returns past + new as a fresh present."""
        return "inplace" if (PAST_LENGTH, None) in self._by_role else "concat"

    def aliases(self) -> dict[str, str]:
        """present -> past names a backend should bind to one buffer (in-place caches)."""
        return {p.present: p.past for p in self.kv} if self.kind == "inplace" else {}

    def new_cache(self, allocate=None, batch: int = 1) -> dict[str, Any]:
        """An empty cache by past name: zero-length pasts (concat), or zeroed buffers of the
        full capacity made by `allocate(shape, dtype)` (in place; numpy by default), with
        `batch` rows where the decoder has a batch axis (one request per row)."""
        if batch != 1 and not 1 <= batch <= self.max_batch:
            raise InputError(f"{self.spec.name}: a cache of {batch} rows, but the decoder takes 1..{self.max_batch}")
        allocate = allocate or (lambda shape, dtype: np.zeros(shape, dtype))
        return {t.name: allocate(self.spec.shape_of(t, {C.AXIS_PAST: 0, C.AXIS_BATCH: batch}), np.dtype(t.dtype))
                for t in self.spec.inputs if t.role in (PAST_KEY, PAST_VALUE)}

    def empty_past(self) -> dict[str, np.ndarray]:
        return self.new_cache()

    def prefill_feeds(self, embeds: np.ndarray, logit_positions: np.ndarray | None = None,
                      cache: dict[str, Any] | None = None, past: int = 0) -> dict[str, Any]:
        """embeds [1, N, D] at the start of the cache, or after `past` tokens already in an
        in-place cache (a kept prompt prefix); logits at the last position unless told."""
        n = embeds.shape[1]
        if past and self.kind != "inplace":
            raise InputError(f"{self.spec.name}: a prefill after {past} cached tokens needs the in-place cache")
        if logit_positions is None:
            logit_positions = np.array([n - 1], np.int64)
        return self._feeds(embeds, past, np.asarray(logit_positions, np.int64), cache if cache is not None else self.new_cache())

    def step_feeds(self, embed: np.ndarray, position: int, cache: dict[str, Any]) -> dict[str, Any]:
        """One new token's embedding [1, 1, D] at `position`, after `cache` (by past name)."""
        return self._feeds(embed, position, np.zeros(1, np.int64), cache)

    def batch_step_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: dict[str, Any]) -> dict[str, Any]:
        """One decode step of several requests: row r's new token embeds[r] [B, 1, D] at
        positions[r] (its past length), after the B-row `cache` (by past name).  Logits
        come back as [B, 1, vocab].  A decoder without a batch axis takes B = 1."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        b = embeds.shape[0]
        if embeds.ndim != 3 or embeds.shape[1] != 1 or positions.shape != (b,):
            raise InputError(f"{self.spec.name}: a batched step takes embeds [B, 1, D] and positions [B], "
                             f"got {list(embeds.shape)} and {list(positions.shape)}")
        if not 1 <= b <= self.max_batch:
            raise InputError(f"{self.spec.name}: a step of {b} requests, but the decoder takes 1..{self.max_batch}"
                             + ("" if self.max_batch > 1 else " (no batch axis: rebuild with avg-export build "
                                                             "--kv-cache inplace --max-batch N)"))
        if self.kind == "concat":
            return self.step_feeds(embeds, int(positions[0]), cache)
        return {self.name(INPUTS_EMBEDS): embeds, self.name(POSITION_IDS): positions[:, None],
                self.name(LOGIT_POSITIONS): np.zeros(1, np.int64), self.name(PAST_LENGTH): positions, **cache}

    def _feeds(self, embeds: np.ndarray, past: int, logit_positions: np.ndarray, cache: dict[str, Any]) -> dict[str, Any]:
        n = embeds.shape[1]
        feeds = {self.name(INPUTS_EMBEDS): embeds, self.name(POSITION_IDS): (past + np.arange(n, dtype=np.int64))[None],
                 self.name(LOGIT_POSITIONS): logit_positions, **cache}
        if self.kind == "inplace":
            feeds[self.name(PAST_LENGTH)] = np.array([past], np.int64)
        else:
            feeds[self.name(ATTENTION_MASK)] = np.ones((1, past + n), np.int64)
        return feeds

    def next_past(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The presents a step returned, as the next step's pasts (the same buffers when
        the cache is updated in place)."""
        return {p.past: outputs[p.present] for p in self.kv}

    def logits(self, outputs: dict[str, Any]) -> Any:
        return outputs[self.name(LOGITS)]


@dataclass(frozen=True)
class Bounds:
    """What a build supports: crops per image and the decoder's context."""

    max_crops: int
    max_context: int
    min_visual: int          # fewest visual tokens an image can give (coarsest granularity)
    max_visual: int          # most (finest granularity, most tiles)
    text_opt: int = 48       # a typical prompt without the image
    max_batch: int = C.DEFAULT_MAX_BATCH   # most requests one decode step takes (in-place cache only)


def feature_name(granularity: int) -> str:
    return f"features_{granularity}"


def vision_spec(hidden: int, granularities: tuple[int, ...], b: Bounds, crop: int, dtype: str) -> GraphSpec:
    crops = Axis(C.AXIS_CROPS, 1, min(3, b.max_crops), b.max_crops)
    return GraphSpec(
        VISION,
        inputs=(TensorSpec("pixel_values", dtype, (C.AXIS_CROPS, 3, crop, crop), PIXEL_VALUES),),
        outputs=tuple(TensorSpec(feature_name(g), dtype, (C.AXIS_CROPS, g, hidden), FEATURES) for g in granularities),
        profiles=(Profile("default", {C.AXIS_CROPS: crops}),),
    )


def router_spec(hidden: int, granularities: tuple[int, ...], b: Bounds, dtype: str) -> GraphSpec:
    """The image part of the router (from the finest features; the coarser ones are its
    pools): its rows' votes and the filter's direction.  The question's part is a
    per-token table the runtime combines them with (runtime/router.py)."""
    crops = Axis(C.AXIS_CROPS, 1, min(3, b.max_crops), b.max_crops)
    finest = granularities[-1]
    return GraphSpec(
        ROUTER,
        inputs=(TensorSpec(feature_name(finest), dtype, (C.AXIS_CROPS, finest, hidden), FEATURES),),
        outputs=(TensorSpec("image_votes", "float32", (len(granularities),), ROUTER_IMAGE_VOTES),
                 TensorSpec("text_direction", "float32", (hidden,), ROUTER_TEXT_DIRECTION)),
        profiles=(Profile("default", {C.AXIS_CROPS: crops}),),
    )


def decoder_spec(hidden: int, layers: int, kv_heads: int, head_dim: int, vocab: int, b: Bounds, dtype: str,
                 kv_cache: str = "concat") -> GraphSpec:
    """concat: past [1, KV, past_len, hd] in, present [1, KV, past_len + seq, hd] out.
    inplace: a cache of the full context [batch, KV, ctx, hd] in and out (a backend binds
    both to one buffer), with `past_length` [batch] saying how many rows of each request
    are valid.  The batch axis (one request per row, each at its own length) is for
    decode steps: prefill stays batch 1, a decode step takes up to b.max_batch requests
    (--max-batch 1: a fixed 1, as for concat).  logit_positions is shared by all rows."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache: expected one of {KV_CACHES}, got {kv_cache!r}")
    ctx = b.max_context
    inplace = kv_cache == "inplace"
    batched = inplace and b.max_batch > 1
    n = C.AXIS_BATCH if batched else 1
    kv = (n, kv_heads, ctx, head_dim) if inplace else (1, kv_heads, C.AXIS_PAST, head_dim)
    kv_out = (n, kv_heads, ctx, head_dim) if inplace else (1, kv_heads, C.AXIS_TOTAL, head_dim)
    inputs = [TensorSpec("inputs_embeds", dtype, (n, C.AXIS_SEQ, hidden), INPUTS_EMBEDS)]
    if inplace:
        inputs.append(TensorSpec("past_length", "int64", (n,), PAST_LENGTH))
    else:
        inputs.append(TensorSpec("attention_mask", "int64", (1, C.AXIS_TOTAL), ATTENTION_MASK))
    inputs += [TensorSpec("position_ids", "int64", (n, C.AXIS_SEQ), POSITION_IDS),
               TensorSpec("logit_positions", "int64", (C.AXIS_LOGITS,), LOGIT_POSITIONS)]
    outputs = [TensorSpec("logits", "float32", (n, C.AXIS_LOGITS, vocab), LOGITS)]
    for i in range(layers):
        inputs += [TensorSpec(C.past_key_name(i), dtype, kv, PAST_KEY, i),
                   TensorSpec(C.past_value_name(i), dtype, kv, PAST_VALUE, i)]
        outputs += [TensorSpec(C.present_key_name(i), dtype, kv_out, PRESENT_KEY, i),
                    TensorSpec(C.present_value_name(i), dtype, kv_out, PRESENT_VALUE, i)]
    # The image bounds the prefill: at least the coarsest granularity's tokens, at most the context.
    # (In place, past_len names no tensor dimension: it is the value of `past_length`,
    # kept in the profiles so that validation points cover short and long pasts.)
    prefill_seq = Axis(C.AXIS_SEQ, min(b.min_visual, ctx), min(b.min_visual + b.text_opt, ctx), ctx)
    # Each request's prefill runs on its own (batch 1); decode steps batch the requests.
    batch = {"prefill": {C.AXIS_BATCH: Axis(C.AXIS_BATCH, 1, 1, 1)},
             "decode": {C.AXIS_BATCH: Axis(C.AXIS_BATCH, 1, min(2, b.max_batch), b.max_batch)}} if batched else {}
    prefill = Profile("prefill", {
        **batch.get("prefill", {}),
        C.AXIS_SEQ: prefill_seq,
        C.AXIS_PAST: Axis(C.AXIS_PAST, 0, 0, 0),
        C.AXIS_TOTAL: Axis(C.AXIS_TOTAL, prefill_seq.min, prefill_seq.opt, prefill_seq.max),
        # Logits for at most SCORING_LOGITS positions (answer scoring); generation needs 1.
        # Not the whole context: TensorRT would reserve [1, ctx, vocab] fp32 for it.
        C.AXIS_LOGITS: Axis(C.AXIS_LOGITS, 1, 1, min(SCORING_LOGITS, ctx)),
    })
    past_opt = min(b.max_visual + b.text_opt, ctx - 1)
    decode = Profile("decode", {
        **batch.get("decode", {}),
        C.AXIS_SEQ: Axis(C.AXIS_SEQ, 1, 1, 1),
        C.AXIS_PAST: Axis(C.AXIS_PAST, min(b.min_visual, ctx - 1), past_opt, ctx - 1),
        C.AXIS_TOTAL: Axis(C.AXIS_TOTAL, min(b.min_visual, ctx - 1) + 1, past_opt + 1, ctx),
        C.AXIS_LOGITS: Axis(C.AXIS_LOGITS, 1, 1, 1),
    })
    return GraphSpec(DECODER, tuple(inputs), tuple(outputs), (prefill, decode))


# Axes whose size follows from others (total = past + seq): never set on their own.
DERIVED_AXES = {C.AXIS_TOTAL: (C.AXIS_PAST, C.AXIS_SEQ)}


def example_sizes(spec: GraphSpec) -> dict[str, int]:
    """Sizes for tracing: inside the bounds, >= 2 and distinct where possible, so the
    exporter neither specialises an axis to 0/1 nor assumes two axes are equal."""
    out: dict[str, int] = {}
    taken: set[int] = set()
    for name, a in sorted(spec.axes().items()):
        if name in DERIVED_AXES:
            continue
        for v in (7, 5, 11, 3, 13, 2, 4, 6, 9, 17):
            if a.min <= v <= a.max and v not in taken:
                break
        else:
            v = a.max
        out[name] = v
        taken.add(v)
    return with_derived(out)


def with_derived(sizes: dict[str, int]) -> dict[str, int]:
    out = dict(sizes)
    for name, parts in DERIVED_AXES.items():
        if all(p in out for p in parts):
            out[name] = sum(out[p] for p in parts)
    return out


def make_feeds(spec: GraphSpec, sizes: dict[str, int], rng: np.random.Generator, dtype: str | None = None,
               zeros: bool = False) -> dict[str, np.ndarray]:
    """Inputs that make sense for each tensor's role: normal floats, a full attention mask,
    positions that continue the past, logits for the last K positions.  A KV cache holds
    normal values in its valid rows (the past) and zeros after them: an in-place cache of
    the whole context then costs memory only for its past (untouched zero pages are not
    resident; 2 GiB for 7B's empty cache).  With a batch axis each row is a request at its
    own length (row_pasts).  zeros: every float input is zeros (for tracing, where values
    are never read)."""
    sizes = with_derived(sizes)
    pasts = row_pasts(sizes)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = spec.shape_of(t, sizes)
        floats = t.role not in (ATTENTION_MASK, POSITION_IDS, LOGIT_POSITIONS, PAST_LENGTH)
        if floats and zeros:
            feeds[t.name] = np.zeros(shape, dtype or t.dtype)
        elif t.role in (PAST_KEY, PAST_VALUE):
            cache = np.zeros(shape, dtype or t.dtype)
            for r, past in enumerate(pasts):
                cache[r, :, :past] = rng.standard_normal((shape[1], past, *shape[3:])).astype(cache.dtype)
            feeds[t.name] = cache
        elif t.role == ATTENTION_MASK:
            feeds[t.name] = np.ones(shape, np.int64)
        elif t.role == POSITION_IDS:
            feeds[t.name] = pasts[:, None] + np.arange(shape[1], dtype=np.int64)[None]
        elif t.role == LOGIT_POSITIONS:
            seq = sizes[C.AXIS_SEQ]
            feeds[t.name] = np.arange(seq - shape[0], seq, dtype=np.int64)
        elif t.role == PAST_LENGTH:
            feeds[t.name] = pasts.copy()
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(dtype or t.dtype)
    return feeds


def row_pasts(sizes: dict[str, int]) -> np.ndarray:
    """The past length of each row of a batch at `sizes` ([batch] int64): the first row at
    past_len, each next row at half the one before (rows at their own lengths, as requests
    in one decode step are; the batch's cache holds less than twice the first row's)."""
    past = sizes.get(C.AXIS_PAST, 0)
    return np.array([past >> r for r in range(sizes.get(C.AXIS_BATCH, 1))], np.int64)


def iter_points(spec: GraphSpec) -> Iterator[tuple[str, dict[str, int]]]:
    """Validation points: each profile at min, opt and max of its axes."""
    for p in spec.profiles:
        for which in ("min", "opt", "max"):
            sizes = {n: getattr(a, which) for n, a in p.axes.items() if n not in DERIVED_AXES}
            yield f"{p.name}:{which}", with_derived(sizes)
