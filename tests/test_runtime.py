"""The torch-free runtime: fidelity with the reference, streaming, sampling, backends."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from avg_edge.errors import InputError
from avg_edge.runtime.pipeline import Pipeline, TextStream
from avg_edge.runtime.sampling import SamplingParams, next_token
from conftest import textured_image

IMAGES = {"square": (672, 672), "tall": (300, 900), "wide": (1200, 300), "tiny": (20, 30)}
QUESTIONS = ("What colour is the background?", "How many small dots are there?")
SETTINGS = (None, 36, 72, 144, 288, 576)


@pytest.fixture(scope="module")
def pipe(tiny_build):
    return Pipeline.load(tiny_build[0], backend="ort")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_greedy_tokens_equal_the_reference(pipe, tiny_model, image):
    """The contract: for an fp32 build, same router choice and same greedy tokens as
    PyTorch for every image shape x question x {router, each fixed granularity}."""
    img = textured_image(*IMAGES[image], seed=len(image))
    for question in QUESTIONS:
        for g in SETTINGS:
            ref = tiny_model.generate(img, question, granularity=g, max_new_tokens=6)
            got = pipe.generate(img, question, granularity=g, max_new_tokens=6)
            where = f"{image} / {question!r} / {g}"
            assert got.granularity == ref.granularity, where
            assert got.token_ids == ref.token_ids, where
            assert got.visual_tokens == ref.visual_tokens, where
            if g is None:
                np.testing.assert_allclose(got.router_logits, ref.router_logits, atol=1e-4)
                assert abs(sum(got.router_probs) - 1) < 1e-9


def test_only_the_chosen_granularity_reaches_the_decoder(pipe):
    seen = []
    dec = pipe.backends["decoder"]
    original = dec.infer_bound

    def spy(feeds, to_host):
        seen.append(feeds["inputs_embeds"].shape[1] if hasattr(feeds["inputs_embeds"], "shape") else None)
        return original(feeds, to_host)

    dec.infer_bound = spy
    try:
        r = pipe.generate(textured_image(640, 480), "What?", granularity=36, max_new_tokens=3)
    finally:
        del dec.infer_bound
    assert r.visual_tokens == 166 and r.visual_tokens_full == 2340
    before, after = __import__("avg_edge.runtime.chat", fromlist=["prompt_ids"]).prompt_ids(
        pipe.tokenizer.encode, pipe.manifest.bos_token_id, "What?")
    assert seen[0] == 166 + len(before) + len(after)                               # prefill: 166 visual + prompt
    assert all(n == 1 for n in seen[1:])                                            # then one token per step


def test_timings_are_filled(pipe):
    r = pipe.generate(textured_image(500, 400), "What colour is the background?", max_new_tokens=5)
    t = r.timings
    assert t.vision > 0 and t.router > 0 and t.prompt_eval > 0 and t.time_to_first_token > 0
    assert t.prompt_eval_count == r.visual_tokens + 1 + len(pipe.tokenizer.encode(
        pipe.manifest.chat_template["before_image"])) + len(pipe.tokenizer.encode(
            pipe.manifest.chat_template["after_image"].format(question="What colour is the background?")))
    assert t.eval_count == len(r.token_ids) and 0 < t.backend < t.total and 0 < t.overhead_share < 1


def test_stream_pieces_join_to_the_text(pipe):
    ids = pipe.tokenizer.encode("How many dots are there? Three small dots, héllo.")
    s = TextStream(pipe.tokenizer)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == pipe.tokenizer.decode(ids).strip()
    assert sum(1 for p in pieces if p) > 3               # it really streams


def test_stream_generator_returns_the_result(pipe):
    gen = pipe.stream(textured_image(300, 300), "What?", max_new_tokens=4)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert "".join(pieces).strip() == result.text


def test_sampling_is_seeded_and_top_k_1_is_greedy(pipe):
    img = textured_image(400, 300)
    a = pipe.generate(img, "What?", temperature=1.5, seed=7, max_new_tokens=8)
    b = pipe.generate(img, "What?", temperature=1.5, seed=7, max_new_tokens=8)
    greedy = pipe.generate(img, "What?", max_new_tokens=8)
    k1 = pipe.generate(img, "What?", temperature=1.5, top_k=1, seed=3, max_new_tokens=8)
    assert a.token_ids == b.token_ids and k1.token_ids == greedy.token_ids
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(50)}
    assert picks == {1}                                   # top_p 0.5 keeps only the best here
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}


@pytest.mark.parametrize("kwargs,match", [
    ({"granularity": 100}, r"expected auto or one of \[36, 72, 144, 288, 576\]"),
    ({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe.generate(textured_image(64, 64), "What?", **kwargs)


def test_backend_checks_inputs_and_times_calls(pipe):
    vision = pipe.backends["vision"]
    with pytest.raises(InputError, match=r"vision.pixel_values: expected dtype float32, got float64"):
        vision.infer({"pixel_values": np.zeros((1, 3, 336, 336))})
    with pytest.raises(InputError, match=r"axis 'crops' expected 1..5, got 6"):
        vision.infer({"pixel_values": np.zeros((6, 3, 336, 336), np.float32)})
    with pytest.raises(InputError, match=r"expected inputs \['pixel_values'\], missing \['pixel_values'\], unexpected \['x'\]"):
        vision.infer({"x": np.zeros(1)})
    vision.infer({"pixel_values": np.zeros((1, 3, 336, 336), np.float32)})
    assert vision.last_inference_time > 0
    assert [t.name for t in vision.input_metadata] == ["pixel_values"]


def test_gpu_provider_fallback_is_loud(tiny_build, caplog):
    import onnxruntime as ort

    from avg_edge.runtime.backends.ort_backend import OrtBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to show")
    folder, result, _ = tiny_build
    with caplog.at_level(logging.WARNING, logger="avg_edge"):
        b = OrtBackend(result.manifest.spec("vision"), folder / "vision.onnx", providers="cuda")
    assert b.on_cpu
    assert any("could not use CUDAExecutionProvider" in r.message and "running on the CPU" in r.message for r in caplog.records)


@pytest.mark.gpu
def test_tensorrt_backend_matches_the_reference(tiny_ckpt, tiny_model, tmp_path):
    from avg_edge.export.build import BuildOptions, build

    build(BuildOptions(model=tiny_ckpt, output=tmp_path / "trt", backend="trt", max_context=1024), progress=lambda s: None)
    trt_pipe = Pipeline.load(tmp_path / "trt", backend="trt")
    img = textured_image(640, 480)
    for g in SETTINGS:
        assert trt_pipe.generate(img, QUESTIONS[0], granularity=g, max_new_tokens=6).token_ids == \
            tiny_model.generate(img, QUESTIONS[0], granularity=g, max_new_tokens=6).token_ids
