"""The torch-free runtime: fidelity with the reference, streaming, sampling, backends."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from avg_edge.errors import InputError
from avg_edge.runtime.pipeline import Pipeline, TextStream
from avg_edge.runtime.sampling import SamplingParams, next_token
from avg_edge.model.tiny import textured_image

IMAGES = {"square": (672, 672), "tall": (300, 900), "wide": (1200, 300), "tiny": (20, 30)}
QUESTIONS = ("What colour is the background?", "How many small dots are there?")
SETTINGS = (None, 36, 72, 144, 288, 576)


@pytest.mark.parametrize("kv_cache", ["inplace", "concat"])
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_greedy_tokens_equal_the_reference(pipe, concat_pipe, tiny_model, image, kv_cache):
    """The contract: for an fp32 build, same router choice and same greedy tokens as
    PyTorch for every image shape x question x {router, each fixed granularity}, with
    either KV cache."""
    if kv_cache == "concat":
        pipe = concat_pipe
    assert pipe.manifest.kv_cache == kv_cache
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
    from avg_edge.calibration.collect import RecordingBackend

    recorders = {name: RecordingBackend(b, 100) for name, b in pipe.backends.items()}
    r = pipe.with_backends(recorders).generate(textured_image(640, 480), "What?", granularity=36, max_new_tokens=3)
    assert r.visual_tokens == 166 and r.visual_tokens_full == 2340
    seen = [f["inputs_embeds"].shape[1] for f in recorders["decoder"].feeds]
    prep = pipe.prepare(textured_image(640, 480), "What?", 36)
    assert seen[0] == 166 + len(prep.ids_before) + len(prep.ids_after)              # prefill: 166 visual + prompt
    assert seen[1:] == [1] * len(r.token_ids[1:])                                   # then one token per step
    assert recorders["router"].feeds == []                                          # fixed granularity: no router


def test_follow_up_questions_reuse_the_routers_image_part(pipe):
    """The router graph runs once per encoded image; each question after that costs only
    the table part, with the same logits as a fresh run."""
    from avg_edge.calibration.collect import RecordingBackend

    recorders = {name: RecordingBackend(b, 100) for name, b in pipe.backends.items()}
    p = pipe.with_backends(recorders)
    img = textured_image(500, 380, seed=4)
    enc = p.encode_image(img)
    first = [p.prepare(enc, q) for q in QUESTIONS]
    assert len(recorders["router"].feeds) == 1
    assert list(recorders["router"].feeds[0]) == ["features_576"]
    for q, got in zip(QUESTIONS, first):
        fresh = pipe.prepare(img, q)
        np.testing.assert_allclose(got.router_logits, fresh.router_logits, rtol=0, atol=1e-6)
        assert got.timings.router > 0
    assert not np.allclose(first[0].router_logits, first[1].router_logits)      # the question matters


def test_inplace_cache_is_written_into_its_own_buffer(pipe):
    """No copy of the cache: each present comes back as the very buffer bound as its past,
    holding the new rows; the concat graph would return fresh, longer arrays."""
    import onnxruntime as ort

    roles, dec = pipe.decoder_roles, pipe.backends["decoder"]
    assert roles.kind == "inplace" and set(roles.aliases()) == {p.present for p in roles.kv}
    cache = roles.new_cache(dec.allocate)
    ptrs = {k: v.data_ptr() for k, v in cache.items()}
    emb = np.random.default_rng(0).standard_normal((1, 50, 64)).astype(np.float32)
    out = dec.infer_kv(roles.prefill_feeds(emb, cache=cache), ("logits",), roles.aliases())
    for p in roles.kv:
        assert out[p.present] is cache[p.past] and out[p.present].data_ptr() == ptrs[p.past]
        assert isinstance(out[p.present], ort.OrtValue) and out[p.present].shape() == [1, 4, 4096, 16]
    step = dec.infer_kv(roles.step_feeds(emb[:, :1], 50, roles.next_past(out)), ("logits",), roles.aliases())
    first = roles.kv[0]
    assert step[first.present].data_ptr() == ptrs[first.past]
    ref = dec.infer(roles.prefill_feeds(np.concatenate([emb, emb[:, :1]], 1)), check=False)   # one 51-token prefill
    np.testing.assert_allclose(step["logits"][0, -1], ref["logits"][0, -1], atol=1e-4)
    np.testing.assert_allclose(step[first.present].numpy()[:, :, :51], ref[first.present][:, :, :51], atol=1e-5)


def test_timings_are_filled(pipe):
    r = pipe.generate(textured_image(500, 400), "What colour is the background?", max_new_tokens=5)
    t = r.timings
    assert t.vision > 0 and t.router > 0 and t.prompt_eval > 0 and t.time_to_first_token > 0
    before, after = pipe.template.render(["What colour is the background?"])
    assert t.prompt_eval_count == r.visual_tokens + 1 + len(pipe.tokenizer.encode(before)) + len(pipe.tokenizer.encode(after))
    assert t.eval_count == len(r.token_ids) and 0 < t.backend < t.total and 0 < t.overhead_share < 1


def test_stream_pieces_join_to_the_text(pipe):
    ids = pipe.tokenizer.encode("How many dots are there? Three small dots, héllo.")
    s = TextStream(pipe.tokenizer)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == pipe.tokenizer.decode(ids).strip()
    assert sum(1 for p in pieces if p) > 3               # it really streams


def test_stream_is_an_iterator_with_the_result_afterwards(pipe):
    gen = pipe.stream(textured_image(300, 300), "What?", max_new_tokens=4)
    assert gen.result is None
    pieces = list(gen)
    assert "".join(pieces).strip() == gen.result.text and gen.result.token_ids
    assert gen.result.token_ids == pipe.generate(textured_image(300, 300), "What?", max_new_tokens=4).token_ids


def test_steps_compose_to_generate(pipe):
    """encode_image once, prepare at a granularity, decode: the same tokens as generate;
    score is the answer's teacher-forced NLL (lower for the greedy answer than for another)."""
    img = textured_image(500, 300, seed=5)
    enc = pipe.encode_image(img)
    for g in (36, 576):
        prepared = pipe.prepare(enc, "What?", g)
        ids = list(pipe.decode(prepared, max_new_tokens=5))
        assert ids == pipe.generate(img, "What?", granularity=g, max_new_tokens=5).token_ids
        greedy = ids[:2] if len(ids) >= 2 else ids + [pipe.manifest.eos_token_id]
        other = [(greedy[0] + 7) % len(pipe.embed_table)] + greedy[1:]
        assert pipe.score(prepared, greedy) < pipe.score(prepared, other)


def test_changing_the_manifest_template_changes_the_prompt(tiny_build, tmp_path):
    """The runtime builds prompts from the build's manifest, not from a constant."""
    import json
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(tiny_build[0], folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["chat_template"]["system"] = "You answer in one word."
    m["chat_template"]["roles"] = ["Human", "Bot"]
    (folder / "manifest.json").write_text(json.dumps(m))
    with Pipeline.load(folder, backend="ort") as custom, Pipeline.load(tiny_build[0], backend="ort") as default:
        img = textured_image(300, 200)
        a, b = custom.prepare(img, "What?", 36), default.prepare(img, "What?", 36)
        tok = custom.tokenizer
        assert a.ids_before == [1, *tok.encode("You answer in one word. Human: ")]
        assert a.ids_after == tok.encode("\nWhat? Bot:")
        assert b.ids_before == [1, *tok.encode(default.template.system + " USER: ")]
        assert a.embeds.shape != b.embeds.shape or not np.array_equal(a.embeds, b.embeds)


def test_closed_pipeline_refuses_work(tiny_build):
    from avg_edge.errors import BackendError

    with Pipeline.load(tiny_build[0], backend="ort") as p:
        p.generate(textured_image(100, 100), "What?", max_new_tokens=1)
    with pytest.raises(BackendError, match="closed"):
        p.generate(textured_image(100, 100), "What?", max_new_tokens=1)


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
    ({"granularity": 36.0}, r"expected auto or one of"),
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


def test_only_the_decoder_sessions_threads_spin(pipe):
    """ONNX Runtime's worker threads spin after a call by default.  Vision and router run
    once per request, so their spinning threads would take the two cores from the next
    graph; the decoder runs step after step and keeps spinning (see OrtBackend)."""
    spinning = {name: b.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                for name, b in pipe.backends.items()}
    assert spinning == {"vision": "0", "router": "0", "decoder": "1"}


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
    from avg_edge.export.exporter import BuildOptions, build

    build(BuildOptions(model=tiny_ckpt, output=tmp_path / "trt", backend="trt", max_context=1024), progress=lambda s: None)
    trt_pipe = Pipeline.load(tmp_path / "trt", backend="trt")
    img = textured_image(640, 480)
    for g in SETTINGS:
        assert trt_pipe.generate(img, QUESTIONS[0], granularity=g, max_new_tokens=6).token_ids == \
            tiny_model.generate(img, QUESTIONS[0], granularity=g, max_new_tokens=6).token_ids
