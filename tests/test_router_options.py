"""The router's options: text candidates from the question alone, cost-aware RGLF, the
health check stage 3 must pass, and a visual-token budget at deployment."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avg_edge.errors import ConfigError, InputError, LimitError
from avg_edge.model.config import AvgLlavaConfig
from avg_edge.model.rglf import preference, rglf_loss
from avg_edge.model.tiny import textured_image, tiny_config_dict
from avg_edge.runtime.chat import router_text_ids
from avg_edge.runtime.pipeline import Pipeline

QUESTIONS = ("What colour is the background?", "How many small dots are there?", "Is the big shape on the left?")


# -- config and the candidates ------------------------------------------------------------
def test_text_candidates_is_read_written_and_validated():
    d = tiny_config_dict(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    assert AvgLlavaConfig.from_dict(d).router_text_candidates == "prompt"      # released checkpoints: the spec
    cfg = AvgLlavaConfig.from_dict({**d, "router_text_candidates": "question", "router_token_cost": 0.05})
    assert (cfg.router_text_candidates, cfg.router_token_cost) == ("question", 0.05)
    again = AvgLlavaConfig.from_dict(cfg.to_dict())
    assert (again.router_text_candidates, again.router_token_cost) == ("question", 0.05)
    with pytest.raises(ConfigError, match="router_text_candidates: expected one of"):
        AvgLlavaConfig.from_dict({**d, "router_text_candidates": "answer"})
    with pytest.raises(ConfigError, match="router_token_cost"):
        AvgLlavaConfig.from_dict({**d, "router_token_cost": -1})


def test_router_text_ids():
    before, after, question = [1, 5, 6], [7, 8, 9, 10], [8, 9]
    assert router_text_ids("prompt", before, after, question) == [1, 5, 6, 7, 8, 9, 10]
    assert router_text_ids("question", before, after, question) == [8, 9]
    with pytest.raises(ValueError, match="expected one of"):
        router_text_ids("system", before, after, question)


@pytest.fixture(scope="module")
def question_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with router_text_candidates = "question"."""
    folder = tmp_path_factory.mktemp("qckpt") / "tiny-question"
    shutil.copytree(tiny_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "router_text_candidates": "question",
                                                   "router_token_cost": 0.25}))
    return folder


@pytest.fixture(scope="module")
def question_build(question_ckpt, tmp_path_factory):
    from avg_edge.export.exporter import BuildOptions, build

    out = tmp_path_factory.mktemp("qbuild") / "tiny-question"
    build(BuildOptions(model=question_ckpt, output=out, max_context=4096), progress=lambda _: None)
    return out


def test_question_candidates_runtime_equals_reference(question_ckpt, question_build, tiny_model):
    """Reference and runtime read the option (config / manifest) and agree on the logits;
    the choice then differs from the spec's filter only through the candidates."""
    from avg_edge.model import load_model

    ref = load_model(question_ckpt)
    assert ref.config.router_text_candidates == "question"
    with Pipeline.load(question_build, backend="ort") as pipe:
        assert pipe.manifest.router["text_from"] == "question"
        assert pipe.manifest.router["alignment"] == {"loss": "rglf", "token_cost": 0.25, "by": "training"}
        img = textured_image(500, 400, seed=3)
        enc = pipe.encode_image(img)
        for q in QUESTIONS:
            got = pipe.prepare(enc, q).router_logits
            with torch.no_grad():
                want = ref.prepare(img, q).router_logits.double().numpy()
                spec = tiny_model.prepare(img, q).router_logits.double().numpy()
            np.testing.assert_allclose(got, want, atol=1e-4)
            assert np.abs(want - spec).max() > 1e-4      # the whole prompt would give other logits


def test_question_candidates_ignore_the_system_prompt(question_ckpt):
    from avg_edge.model import load_model

    m = load_model(question_ckpt)
    g = torch.Generator().manual_seed(0)
    scaled = {n: torch.randn(2, n, m.config.hidden_size, generator=g) for n in m.config.granularities}
    q = m.tokenizer.encode("What colour is it?")
    with torch.no_grad():
        a = m.router(scaled, m.router_text([1, 40, 41, 42], [43], q))
        b = m.router(scaled, m.router_text([1, 50], [51, 52, 53], q))
    assert torch.equal(a, b)


def test_forward_many_equals_one_forward_per_prompt(tiny_model):
    """Stage 3's batched form (every prompt's text rows along the position axis)."""
    router = tiny_model.router
    g = torch.Generator().manual_seed(2)
    d = tiny_model.config.hidden_size
    for crops in (1, 3):
        scaled = {n: torch.randn(crops, n, d, generator=g) for n in tiny_model.config.granularities}
        texts = [torch.randn(t, d, generator=g) for t in (5, 40, 32, 0)]
        with torch.no_grad():
            many = router.forward_many(scaled, texts)
            one = torch.stack([router(scaled, t) for t in texts])
        torch.testing.assert_close(many, one, atol=2e-5, rtol=1e-5)


# -- cost-aware RGLF --------------------------------------------------------------------
def test_token_cost_makes_the_cheap_granularity_preferred():
    gs = (36, 72, 144, 288, 576)
    nll = torch.tensor([[0.30, 0.30, 0.30, 0.295, 0.29]])       # an easy question: nearly equal
    assert int(preference(nll, gs, 0.0).argmin()) == 4          # the paper's RGLF: noise picks 576
    assert int(preference(nll, gs, 0.05).argmin()) == 0         # with a cost: 36
    hard = torch.tensor([[2.0, 1.9, 0.5, 0.45, 0.1]])
    assert int(preference(hard, gs, 0.05).argmin()) == 4        # a real gain still wins
    with pytest.raises(ValueError, match="token_cost"):
        preference(nll, gs, -0.1)
    logits = torch.zeros(1, 5, requires_grad=True)
    rglf_loss(logits, preference(nll, gs, 0.05)).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 4]            # gradient descent raises 36, lowers 576


# -- the check after stage 3 --------------------------------------------------------------
def test_router_check_passes_the_shipped_demo_router():
    from avg_edge.model.checkpoint import load_model
    from avg_edge.model.demo import CHECKPOINT
    from avg_edge.model.demo.evaluate import router_check

    m = load_model(CHECKPOINT)
    check = router_check(m, m.tokenizer, "val", 6)
    assert check.problems() == [], check


def test_router_check_fails_a_pinned_router_and_one_that_ignores_the_question():
    from avg_edge.model.checkpoint import load_model
    from avg_edge.model.demo import CHECKPOINT
    from avg_edge.model.demo.evaluate import router_check

    m = load_model(CHECKPOINT)
    with torch.no_grad():
        m.router.router[2].bias[4] -= 1e4          # one granularity's vote far below the rest
    problems = router_check(m, m.tokenizer, "val", 3).problems()
    assert any("pinned" in p for p in problems) and any("do not depend on the question" in p for p in problems)


# -- the visual-token budget ------------------------------------------------------------
def test_budget_picks_the_best_granularity_that_fits(pipe):
    img = textured_image(672, 672, seed=1)
    enc = pipe.encode_image(img)
    counts = pipe.visual_token_counts(enc)
    assert list(counts.values()) == sorted(counts.values())
    for q in QUESTIONS:
        free = pipe.prepare(enc, q)
        order = [pipe.granularities[i] for i in np.argsort(-free.router_logits, kind="stable")]
        for budget in sorted(set(counts.values())):
            p = pipe.prepare(enc, q, max_visual_tokens=budget)
            want = next(g for g in order if counts[g] <= budget)
            assert (p.granularity, p.visual_tokens) == (want, counts[want])
            assert p.visual_tokens <= budget
            np.testing.assert_array_equal(p.router_logits, free.router_logits)
    r = pipe.generate(img, QUESTIONS[0], max_new_tokens=4, max_visual_tokens=counts[36])
    assert (r.granularity, r.visual_tokens) == (36, counts[36])


def test_budget_errors(pipe):
    enc = pipe.encode_image(textured_image(672, 672, seed=1))
    counts = pipe.visual_token_counts(enc)
    with pytest.raises(LimitError, match=rf"{counts[36] - 1} visual tokens fit no granularity"):
        pipe.prepare(enc, "What?", max_visual_tokens=counts[36] - 1)
    with pytest.raises(LimitError, match=rf"granularity 576 needs {counts[576]} visual tokens"):
        pipe.prepare(enc, "What?", granularity=576, max_visual_tokens=counts[288])
    for bad in (0, -5, 1.5, True, "100"):
        with pytest.raises(InputError, match="max_visual_tokens: expected a positive integer"):
            pipe.generate(enc, "What?", max_visual_tokens=bad)
