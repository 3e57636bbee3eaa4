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
