from __future__ import annotations

import torch

from avg_edge.model.router import GranularityRouter, filter_text


def _scaled(model, crops=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return {n: torch.randn(crops, n, d, generator=g) for n in model.config.granularities}


def test_decision_is_deterministic_and_is_the_argmax(tiny_model):
    scaled = _scaled(tiny_model)
    text = torch.randn(40, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = tiny_model.router(scaled, text)
        b = tiny_model.router(scaled, text)
        chosen, logits = tiny_model.choose(scaled, text, None)
    assert torch.equal(a, b)
    assert logits.shape == (5,)
    assert chosen == tiny_model.config.granularities[int(a.argmax())]


def test_merger_attends_across_crops_not_tokens(tiny_model):
    """batch_first=False: on [crops, 1148, D] attention mixes the crops at each position."""
    router: GranularityRouter = tiny_model.router
    scaled = _scaled(tiny_model, crops=3)
    text = torch.randn(10, tiny_model.config.hidden_size)
    seen = {}
    hook = router.merger.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    try:
        with torch.no_grad():
            router(scaled, text)
            before = seen["out"]
            scaled[36][1, 0] += 5.0          # crop 1, sequence position 0 only
            router(scaled, text)
            after = seen["out"]
    finally:
        hook.remove()
    assert before.shape == (3, 1148, tiny_model.config.hidden_size)
    changed = (after - before).abs().amax(dim=-1) > 1e-6   # [crops, positions]
    assert changed[:, 0].all(), "every crop's position 0 must see the change (attention over crops)"
    assert not changed[:, 1:].any(), "other positions must not (no attention over tokens)"


def test_text_filter_sorts_by_mean_cosine_and_zero_pads():
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    global_tokens = torch.stack([e1, e1 * 3.0])                       # all along e1
    text = torch.stack([-e1, e2, 2 * e1, e1 + e2])                     # cos: -1, 0, 1, 0.707
    out = filter_text(global_tokens, text, k=6)
    assert out.shape == (6, 4)
    assert torch.equal(out[:4], torch.stack([2 * e1, e1 + e2, e2, -e1]))
    assert torch.equal(out[4:], torch.zeros(2, 4))
    assert filter_text(global_tokens, text, k=2).tolist() == [(2 * e1).tolist(), (e1 + e2).tolist()]


def _split_cases(model):
    """(crops, prompt length): one crop, several crops, prompts shorter and longer than k,
    and a prompt with repeated tokens (equal scores)."""
    vocab = model.config.text.vocab_size
    g = torch.Generator().manual_seed(3)
    for crops, t in ((1, 40), (3, 10), (5, 60)):
        yield crops, torch.randint(0, vocab, (t,), generator=g)
    yield 2, torch.tensor([5, 5, 5, 7, 7, 9] * 8)


def _pooled(model, crops, seed):
    """Features as the scaler makes them: every granularity a pool of the 576 tokens."""
    from avg_edge.model.scaler import scale_all

    g = torch.Generator().manual_seed(seed)
    return scale_all(torch.randn(crops, 576, model.config.hidden_size, generator=g), model.config.granularities)


def test_split_router_equals_the_router(tiny_model):
    """image part (from the 576 tokens) + per-token text part + the filter's direction =
    the spec's router."""
    router = tiny_model.router
    emb = tiny_model.language_model.get_input_embeddings().weight
    with torch.no_grad():
        for crops, ids in _split_cases(tiny_model):
            scaled = _pooled(tiny_model, crops, seed=crops)
            whole = router(scaled, emb[ids])
            split = router.combine(router.image_votes(scaled[576]), router.text_direction(scaled[576]), emb[ids])
            torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
        # the split must also see the question (another prompt, other logits) and the image
        other = router.combine(router.image_votes(scaled[576]), router.text_direction(scaled[576]), emb[ids.flip(0)[:3]])
        assert (other - whole).abs().max() > 1e-4
        scaled[576][1, 7] += 3.0
        assert (router.image_votes(scaled[576]) - router.image_votes(scaled[576] * 0.5)).abs().max() > 1e-4


def test_runtime_router_text_equals_the_router(tiny_model):
    """runtime.router.RouterText (numpy, from the build's table) = the PyTorch router."""
    import numpy as np

    from avg_edge.export.graphs import router_text_table
    from avg_edge.runtime.router import RouterText

    router = tiny_model.router
    emb = tiny_model.language_model.get_input_embeddings().weight
    rt = RouterText(**{k: v for k, v in router_text_table(tiny_model).items() if k != "norm_eps"},
                    norm_eps=float(router.norm.eps))
    with torch.no_grad():
        for crops, ids in _split_cases(tiny_model):
            scaled = _pooled(tiny_model, crops, seed=crops)
            whole = router(scaled, emb[ids]).numpy()
            got = rt.logits(router.image_votes(scaled[576]).numpy(), router.text_direction(scaled[576]).numpy(),
                            ids.numpy(), emb[ids].numpy())
            np.testing.assert_allclose(got, whole, atol=1e-5, rtol=1e-5)
            assert int(np.argmax(got)) == int(np.argmax(whole))
