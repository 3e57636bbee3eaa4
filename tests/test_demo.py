"""The demo task generator, its tokenizer and the shipped demo checkpoint."""

from __future__ import annotations

import io
import json

import pytest

from avg_edge.model.demo import CHECKPOINT
from avg_edge.model.demo.data import COARSE, FINE, KINDS, MARKERS, PINPOINTS, sample
from avg_edge.runtime.preprocess import select_best_resolution
from avg_edge.runtime.text import is_correct


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_generator_is_deterministic():
    a, b = sample("test", 7), sample("test", 7)
    assert a.image.tobytes() == b.image.tobytes() and _png(a.image) == _png(b.image)
    assert a.qas == b.qas and a.facts == b.facts


def test_splits_differ():
    imgs = {split: [sample(split, i).image.tobytes() for i in range(5)] for split in ("train", "val", "test")}
    assert not set(imgs["train"]) & set(imgs["test"])
    assert not set(imgs["val"]) & set(imgs["test"])
    assert not set(imgs["train"]) & set(imgs["val"])


def test_one_question_per_kind_with_short_answers():
    s = sample("val", 3)
    assert [qa.kind for qa in s.qas] == list(KINDS)
    assert all(1 <= len(qa.answer.split()) <= 2 for qa in s.qas)
    assert {qa.kind for qa in s.qas if qa.coarse} == set(COARSE)
    assert {qa.kind for qa in s.qas if not qa.coarse} == set(FINE)


def test_images_use_several_pinpoints():
    chosen = {select_best_resolution(sample("train", i).image.size, PINPOINTS) for i in range(60)}
    assert len(chosen) >= 4


def _touching(mask, other) -> bool:
    """Does a `mask` pixel have an `other` pixel among its 8 neighbours?"""
    import numpy as np

    grown = np.zeros_like(other)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(other, dy, 0), dx, 1)
    return bool((grown & mask).any())


def _right_of_white(px, scale: float):
    """The pixels just right of a white dot: up to 6 tile px, i.e. across the 3 px of
    background between the dot and its slot's edge and into the patch on its right."""
    import numpy as np

    white = (px == 255).all(-1)
    near = np.zeros_like(white)
    for dx in range(1, int(np.ceil(6 / scale)) + 1):
        near |= np.roll(white, dx, 1)         # near[y, x] = white[y, x - dx]
    return white, near


def _scale(img) -> float:
    pw, ph = select_best_resolution(img.size, PINPOINTS)
    return min(pw / img.width, ph / img.height)


def test_markers_are_drawn_where_the_answers_say():
    """Every white dot is on the background, and just right of it is a tile of the
    white_dot answer's colour and of no other; black dots sit only inside tiles of the
    black_dot colour; DOTTED of each per image; and each colour covers about the same
    area (every cluster has the four), so a 4x4-pooled cell holds the same colours
    whatever the answer."""
    import numpy as np

    from avg_edge.model.demo.data import DOTTED

    def rectangles(m):  # top-left corners: no neighbour of the mask above or to the left
        return int((m & ~np.roll(m, 1, 0) & ~np.roll(m, 1, 1)).sum())

    for i in range(12):
        s = sample("train", i)
        px = np.asarray(s.image).astype(int)
        masks = {c: np.abs(px - np.array(rgb)).sum(-1) < 12 for c, rgb in MARKERS.items()}
        white, right = _right_of_white(px, _scale(s.image))
        black = (px == 0).all(-1)
        assert {c for c, m in masks.items() if (m & right).any()} == {s.facts["white_dot"]}, (i, s.facts)
        above = np.roll(white, -1, 0) & ~white                               # the row over each dot
        assert not any((m & above).any() for m in masks.values()), i        # on the background, not in a tile
        assert {c for c, m in masks.items() if _touching(m, black)} == {s.facts["black_dot"]}, (i, s.facts)
        n = min(DOTTED, int(s.facts["clusters"]))
        assert rectangles(white) == n and rectangles(black) == n, i
        areas = [int(m.sum()) for m in masks.values()]
        assert max(areas) <= 1.35 * min(areas), (i, areas)


def test_every_cluster_fills_one_pooled_cell():
    """Cluster corners lie on the 56-px cell grid of the AnyRes tiles (so 4x4 pooling
    averages a whole cluster into one token) and the marker half never touches the shape."""
    from avg_edge.model.demo.data import CELL, _padding

    for i in range(40):
        s = sample("val", i)
        assert 1 <= len(s.clusters) == int(s.facts["clusters"])
        pw, ph = select_best_resolution(s.image.size, PINPOINTS)
        scale = min(pw / s.image.width, ph / s.image.height)
        pad_x, pad_y = _padding(s.image.size)
        for x, y in s.clusters:
            tx, ty = x * scale + pad_x, y * scale + pad_y
            assert tx == pytest.approx(round(tx / CELL) * CELL, abs=1e-6)
            assert ty == pytest.approx(round(ty / CELL) * CELL, abs=1e-6)
            on_left = x + CELL / scale <= s.image.width / 2 + 1
            assert on_left == (s.facts["side"] == "right")


def test_curriculum_variants_keep_the_layout_and_reduce_the_colours():
    import numpy as np

    full, carpet1, carpet2, two = (sample("train", 4, k) for k in (0, 1, 2, 3))
    assert [q.kind for q in carpet1.qas] == [q.kind for q in sample("train", 5, 1).qas] == [*COARSE, "white_dot"]
    assert [q.kind for q in carpet2.qas] == [q.kind for q in two.qas] == list(KINDS)
    assert full.facts == two.facts and full.clusters == two.clusters
    px = lambda s: np.asarray(s.image).astype(int)  # noqa: E731
    area = lambda s, c: int((np.abs(px(s) - MARKERS[c]).sum(-1) < 12).sum())  # noqa: E731
    answer, other = full.facts["white_dot"], full.facts["black_dot"]
    assert {c for c in MARKERS if area(carpet1, c)} == {answer}
    assert {c for c in MARKERS if area(carpet2, c)} == {answer, other}
    assert {c for c in MARKERS if area(two, c)} == set(MARKERS)
    assert area(carpet1, answer) > 5 * area(full, answer)              # a carpet, not clusters
    for carpet in (carpet1, carpet2):      # right of a white dot: the answer only
        _, right = _right_of_white(px(carpet), _scale(carpet.image))
        assert {c for c in MARKERS if ((np.abs(px(carpet) - MARKERS[c]).sum(-1) < 12) & right).any()} == {answer}
    assert px(full).tobytes() != px(two).tobytes()
    with pytest.raises(ValueError, match="curriculum"):
        sample("train", 5, 4)


def test_tokenizer_covers_every_prompt():
    from avg_edge.model.demo.core import demo_config, encode_qa
    from avg_edge.model.demo.tokenizer import build_tokenizer, vocabulary

    tok = build_tokenizer()
    vocab = vocabulary()
    assert vocab[:3] == ["<unk>", "<s>", "</s>"]
    cfg = demo_config(len(vocab))

    class Enc:
        def encode(self, text):
            return tok.encode(text, add_special_tokens=False).ids

    for i in range(20):
        for qa in sample("train", i).qas:
            p = encode_qa(Enc(), cfg, qa)
            assert 0 not in p.before + p.after + p.answer  # no <unk>
            assert tok.decode(p.answer[:-1]) == qa.answer


# -- the shipped checkpoint ------------------------------------------------------------
needs_ckpt = pytest.mark.skipif(not (CHECKPOINT / "config.json").is_file(), reason="demo checkpoint not built")


@needs_ckpt
def test_shipped_checkpoint_is_small_and_safetensors_only():
    files = [p for p in CHECKPOINT.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    assert cfg["router_select"] is True and cfg["vis_token_granularity"] == [36, 72, 144, 288, 576]


@pytest.fixture(scope="module")
def demo_model():
    import torch

    from avg_edge.model import load_model

    torch.set_num_threads(2)
    return load_model(CHECKPOINT)


# Questions from the TEST split (never used for training or choosing weights), the ones
# of test images 0-7 the shipped weights answer right through the router (accuracies per
# kind: benchmarks/results/demo_eval.md).  Coarse kinds: background and side.  The fine
# question: the router must route it to 144 tokens or more (it is near chance at 36 and
# 72) and the answer must be right.
HANDFUL = [(0, "background"), (1, "side"), (2, "background"), (3, "side"), (4, "background"), (5, "side")]
FINE_ROUTED = [0, 1, 2, 3]


@needs_ckpt
@pytest.mark.parametrize("index", FINE_ROUTED)
def test_shipped_router_gives_the_white_dot_detail_and_reads_it(demo_model, index):
    s = sample("test", index)
    qa = next(q for q in s.qas if q.kind == "white_dot")
    result = demo_model.generate(s.image, qa.question, max_new_tokens=4)
    assert result.granularity >= 144, (qa.question, result.granularity)
    assert is_correct(result.text, qa.answer), (qa.question, result)


@needs_ckpt
@pytest.mark.parametrize("index,kind", HANDFUL)
def test_shipped_model_answers_through_the_router(demo_model, index, kind):
    s = sample("test", index)
    qa = next(q for q in s.qas if q.kind == kind)
    result = demo_model.generate(s.image, qa.question, max_new_tokens=4)
    assert result.granularity in (36, 72, 144, 288, 576)
    assert is_correct(result.text, qa.answer), (qa.question, result)
