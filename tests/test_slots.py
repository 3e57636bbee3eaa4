"""DecodeSlots (avg-serve --parallel N): requests decoded together in one batched decoder
call per step get exactly the tokens each gets alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from avg_edge import constants as C
from avg_edge.errors import Busy, InputError, UsageError
from avg_edge.model.tiny import textured_image
from avg_edge.runtime.pipeline import Pipeline
from avg_edge.runtime.sampling import SamplingParams
from avg_edge.runtime.slots import DecodeSlots
from avg_edge.specs import Bounds, DecoderRoles, decoder_spec

# (image size, seed, question, granularity, max_new_tokens): different prompts, lengths and routes.
REQUESTS = (
    ((500, 380), 1, "What colour is the background?", 36, 9),
    ((300, 600), 2, "How many small dots are there?", None, 15),
    ((20, 30), 3, "What?", 72, 12),
    ((672, 336), 4, "Describe the picture.", 36, 7),
)


@pytest.fixture(scope="module")
def prepared(pipe):
    return [pipe.prepare(textured_image(*size, seed=seed), q, g) for size, seed, q, g, _ in REQUESTS]


def _alone(pipe, i, sampling=None):
    size, seed, q, g, n = REQUESTS[i]
    s = sampling or SamplingParams()
    return pipe.generate(textured_image(*size, seed=seed), q, granularity=g, max_new_tokens=n,
                         temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)


def _run(slots, prepared, sampling=lambda i: None):
    """Requests join and leave at different times: 0 and 1 start; after three steps 2
    joins while they decode; 1 is released after two more; 3 joins in the freed slot."""
    tokens, results, slot_of = {}, {}, {}

    def take(i, event):
        slot_of[i] = event.slot
        record(event)

    def record(event):
        i = next(k for k, s in slot_of.items() if s == event.slot and k not in results)
        if event.token is not None:
            tokens.setdefault(i, []).append(event.token)
        if event.finished:
            results[i] = event.result

    def steps(n):
        for _ in range(n):
            for event in slots.step():
                record(event)

    take(0, slots.admit(prepared[0], REQUESTS[0][4], sampling(0)))
    take(1, slots.admit(prepared[1], REQUESTS[1][4], sampling(1)))
    steps(3)
    take(2, slots.admit(prepared[2], REQUESTS[2][4], sampling(2)))
    steps(2)
    assert 1 not in results, "request 1 should still be decoding"
    slots.release(slot_of[1])
    results[1] = None
    assert slot_of[1] in slots.free
    take(3, slots.admit(prepared[3], REQUESTS[3][4], sampling(3)))
    assert slot_of[3] == slot_of[1]                  # the lowest free slot is reused
    while slots.active:
        steps(1)
    return tokens, results


def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(pipe, prepared):
    alone = [_alone(pipe, i) for i in range(len(REQUESTS))]
    with DecodeSlots(pipe, 4) as slots:
        tokens, results = _run(slots, prepared)
        assert slots.free == (0, 1, 2, 3) and slots.active == ()
    for i, want in enumerate(alone):
        if i == 1:                                   # released midway: a prefix of its answer
            assert 0 < len(tokens[1]) < len(want.token_ids) and tokens[1] == want.token_ids[:len(tokens[1])]
            continue
        got = results[i]
        assert got.token_ids == want.token_ids == tokens[i], i
        assert (got.text, got.finish_reason, got.granularity, got.visual_tokens) == \
               (want.text, want.finish_reason, want.granularity, want.visual_tokens), i
        t = got.timings
        assert t.eval_count == len(want.token_ids) and t.prompt_eval_count == prepared[i].embeds.shape[1]
        assert t.prompt_eval > 0 and t.eval > 0 and 0 < t.time_to_first_token <= t.total and t.backend > 0
    assert results[2].router_probs is None and alone[1].router_probs is not None
    # Request 3 took request 1's slot: the system prompt's cache entries were kept.
    before = [len(p.ids_before) for p in prepared]
    assert [results[i].timings.prompt_cached_count for i in (0, 2)] == [0, 0]
    assert 0 < results[3].timings.prompt_cached_count <= min(before[1], before[3])


def test_a_kept_prefix_survives_its_free_row_riding_along(pipe, prepared):
    """A request in a slot whose row rode along in other requests' steps (a dummy token
    after its kept prefix) still gets its own tokens, prefilling only the new part."""
    from avg_edge.calibration.collect import RecordingBackend

    alone = _alone(pipe, 2)
    recorder = RecordingBackend(pipe.backends["decoder"], 1000)
    slots = DecodeSlots(pipe.with_backends({"decoder": recorder}), 2)
    slots.admit(prepared[0], 20)
    slots.admit(prepared[1], 20)
    slots.release(0)
    for _ in range(3):                                # slot 0 is free, below slot 1: it rides along
        slots.step()
    assert recorder.feeds[-1]["past_length"][0] == len(prepared[0].ids_before)
    first = slots.admit(prepared[2], REQUESTS[2][4])
    kept = prepared[2].embeds.shape[1] - recorder.feeds[-1]["inputs_embeds"].shape[1]   # not prefilled again
    assert first.slot == 0 and recorder.feeds[-1]["past_length"].tolist() == [kept]
    assert 0 < kept <= len(prepared[2].ids_before)
    tokens = [first.token]
    while 0 in slots.active:
        tokens += [e.token for e in slots.step() if e.slot == 0 and e.token is not None]
    assert tokens == alone.token_ids


def test_sampled_requests_equal_their_single_request_runs(pipe, prepared):
    settings = [SamplingParams(0.9, top_k=40, seed=11), SamplingParams(1.2, seed=5),
                SamplingParams(0.7, top_p=0.9, seed=3), SamplingParams(1.0, top_k=5, top_p=0.8, seed=0)]
    alone = [_alone(pipe, i, settings[i]) for i in range(len(REQUESTS))]
    assert alone[0].token_ids != _alone(pipe, 0).token_ids          # sampling does change the answer
    with DecodeSlots(pipe, 4) as slots:
        tokens, results = _run(slots, prepared, lambda i: settings[i])
    for i in (0, 2, 3):
        assert results[i].token_ids == alone[i].token_ids, i


def test_one_decoder_call_per_step_for_all_active_requests(pipe, prepared):
    """The decoder sees each prefill alone (batch 1) and each step once with every active
    row; through a backend that returns new arrays (no in-place fast path) the tokens stay
    the same: the presents are written back into the slots' rows."""
    from avg_edge.calibration.collect import RecordingBackend

    recorders = {name: RecordingBackend(b, 1000) for name, b in pipe.backends.items()}
    recording = pipe.with_backends(recorders)
    slots = DecodeSlots(recording, 3)
    first = [slots.admit(prepared[i], 4) for i in (0, 2, 3)]
    events = slots.step()
    feeds = recorders["decoder"].feeds
    assert [f["inputs_embeds"].shape[:2] for f in feeds] == [(1, p.embeds.shape[1]) for p in (prepared[0], prepared[2], prepared[3])] + [(3, 1)]
    assert feeds[-1]["past_length"].tolist() == [prepared[i].embeds.shape[1] for i in (0, 2, 3)]
    assert [e.slot for e in events] == [0, 1, 2]
    while slots.active:
        events += slots.step()
    for k, i in enumerate((0, 2, 3)):
        size, seed, q, g, _ = REQUESTS[i]
        want = pipe.generate(textured_image(*size, seed=seed), q, granularity=g, max_new_tokens=4).token_ids
        assert [first[k].token] + [e.token for e in events if e.slot == k and e.token is not None] == want


def test_stop_at_eos_and_length_follow_token_stream(pipe, prepared):
    """</s> ends a request without being emitted (finish "stop"); max_new_tokens ends it
    after the token (finish "length"); a request that stops frees its slot at once."""
    want = list(pipe.decode(prepared[0], 9))
    eos = next(t for t in want[2:] if t not in want[:2])           # a token first seen after two others
    stopping = pipe.with_backends(pipe.backends)
    stopping.manifest = replace(pipe.manifest, eos_token_id=eos)
    stream = stopping.decode(prepared[0], 9)
    expected = list(stream)
    assert stream.finish_reason == "stop" and expected == want[:want.index(eos)]
    slots = DecodeSlots(stopping, 2)
    events = [slots.admit(prepared[0], 9), slots.admit(prepared[2], 1)]
    assert events[1].finished and events[1].finish_reason == "length" and events[1].token is not None
    assert slots.active == (0,)
    while slots.active:
        events += slots.step()
    ours = [e for e in events if e.slot == 0]
    assert [e.token for e in ours if e.token is not None] == expected
    assert ours[-1].finished and ours[-1].token is None and ours[-1].finish_reason == "stop"
    assert ours[-1].result.token_ids == expected and ours[-1].result.finish_reason == "stop"


def test_busy_release_and_bad_calls(pipe, prepared):
    slots = DecodeSlots(pipe, 2)
    a = slots.admit(prepared[0], 50)
    slots.admit(prepared[2], 50)
    with pytest.raises(Busy, match="all 2 decode slots are busy"):
        slots.admit(prepared[3], 50)
    slots.release(a.slot)
    slots.release(a.slot)                                           # releasing a free slot does nothing
    assert slots.free == (0,) and slots.active == (1,)
    assert slots.admit(prepared[3], 50).slot == 0
    with pytest.raises(InputError, match=r"slot: expected 0\.\.1, got 2"):
        slots.release(2)
    with pytest.raises(InputError, match="max_new_tokens"):
        DecodeSlots(pipe, 1).admit(prepared[0], 0)
    slots.close()
    with pytest.raises(UsageError, match="closed"):
        slots.step()


def test_parallel_needs_a_decoder_that_batches(pipe, concat_pipe, prepared):
    with pytest.raises(UsageError, match=r"--parallel 2 needs a build whose decoder batches \(avg-export build "
                                         r"--kv-cache inplace \.\.\.\); .*concat"):
        DecodeSlots(concat_pipe, 2)
    with pytest.raises(UsageError, match=r"--parallel 5: this build's decoder batches at most 4 requests.*--max-batch 5"):
        DecodeSlots(pipe, 5)
    with pytest.raises(UsageError, match="expected a positive number of slots, got 0"):
        DecodeSlots(pipe, 0)
    # One slot works with the concat cache too (the server's default --parallel 1).
    slots = DecodeSlots(concat_pipe, 1)
    prep = concat_pipe.prepare(textured_image(20, 30, seed=3), "What?", 72)
    events = [slots.admit(prep, 6)]
    while slots.active:
        events += slots.step()
    assert events[-1].result.token_ids == list(concat_pipe.decode(prep, 6))


def test_a_format_5_build_still_loads_and_decodes_one_request_per_step(tiny_build, tmp_path, pipe, prepared):
    """A build from before the batch axis (manifest format 5: every decoder tensor has a
    fixed batch of 1) loads, answers as before, and refuses --parallel above 1."""
    old = tmp_path / "format5"
    shutil.copytree(tiny_build[0], old)
    m = json.loads((old / C.MANIFEST_FILE).read_text())
    m["format_version"] = 5
    dec = m["graphs"]["decoder"]
    for t in (*dec["inputs"], *dec["outputs"]):
        t["shape"] = [1 if d == C.AXIS_BATCH else d for d in t["shape"]]
    for p in dec["profiles"]:
        p["axes"].pop(C.AXIS_BATCH)
    (old / C.MANIFEST_FILE).write_text(json.dumps(m))
    old_pipe = Pipeline.load(old, backend="ort")
    assert old_pipe.decoder_roles.max_batch == 1 and old_pipe.manifest.format_version == 5
    with pytest.raises(UsageError, match="no batch axis: manifest format 5"):
        DecodeSlots(old_pipe, 2)
    want = list(pipe.decode(prepared[2], 6))
    assert list(old_pipe.decode(prepared[2], 6)) == want
    slots = DecodeSlots(old_pipe, 1)
    events = [slots.admit(prepared[2], 6)]
    while slots.active:
        events += slots.step()
    assert events[-1].result.token_ids == want


def test_the_decoder_spec_batches_only_the_inplace_cache():
    b = Bounds(5, 4096, 36, 2928, max_batch=8)
    inplace = decoder_spec(64, 2, 4, 16, 300, b, "float32", "inplace")
    shapes = {t.name: t.shape for t in (*inplace.inputs, *inplace.outputs)}
    assert shapes["inputs_embeds"] == (C.AXIS_BATCH, C.AXIS_SEQ, 64) and shapes["past_length"] == (C.AXIS_BATCH,)
    assert shapes["position_ids"] == (C.AXIS_BATCH, C.AXIS_SEQ) and shapes["logit_positions"] == (C.AXIS_LOGITS,)
    assert shapes["past_key_values.1.key"] == shapes["present.1.key"] == (C.AXIS_BATCH, 4, 4096, 16)
    assert shapes["logits"] == (C.AXIS_BATCH, C.AXIS_LOGITS, 300)
    prefill, decode = inplace.profiles
    batch = [(p.axes[C.AXIS_BATCH].min, p.axes[C.AXIS_BATCH].opt, p.axes[C.AXIS_BATCH].max) for p in (prefill, decode)]
    assert batch == [(1, 1, 1), (1, 2, 8)]                    # prefill per request, decode steps batched
    assert DecoderRoles(inplace).max_batch == 8
    for spec in (decoder_spec(64, 2, 4, 16, 300, b, "float32", "concat"),
                 decoder_spec(64, 2, 4, 16, 300, replace(b, max_batch=1), "float32", "inplace")):
        assert all(t.shape[0] == 1 for t in (*spec.inputs, *spec.outputs) if t.name != "logit_positions")
        assert all(C.AXIS_BATCH not in p.axes for p in spec.profiles) and DecoderRoles(spec).max_batch == 1
    roles = DecoderRoles(inplace)
    cache = roles.new_cache(batch=3)
    feeds = roles.batch_step_feeds(np.zeros((3, 1, 64), np.float32), np.array([40, 7, 100]), cache)
    assert feeds["past_length"].tolist() == [40, 7, 100] and feeds["position_ids"].tolist() == [[40], [7], [100]]
    inplace.check_inputs(feeds)
    with pytest.raises(InputError, match="a step of 9 requests, but the decoder takes 1..8"):
        roles.batch_step_feeds(np.zeros((9, 1, 64), np.float32), np.zeros(9), roles.new_cache(batch=8))


@pytest.mark.parametrize("layers,context,precision,batch", [
    (32, None, "fp16", 1),          # 7B at 4096 tokens: 2 GiB of cache a request, no room to validate more
    (32, 1024, "fp16", 2),          # 0.5 GiB a request
    (2, None, "fp16", 4),           # few layers: the default 4
])
def test_the_default_batch_bound_follows_the_cache_size(layers, context, precision, batch):
    from avg_edge.export.exporter import BuildOptions, auto_max_batch, cache_bytes
    from avg_edge.model.config import AvgLlavaConfig
    from avg_edge.model.tiny import full_width_config

    config = AvgLlavaConfig.from_dict(full_width_config("7b", layers))
    per_request = cache_bytes(config, context, precision)
    assert per_request == layers * 2 * 32 * (context or 4096) * 128 * 2
    assert auto_max_batch(per_request) == batch
    opts = BuildOptions(model=Path("m"), output=Path("o"), precision=precision)
    assert opts.resolved_max_batch(per_request) == batch
    assert BuildOptions(model=Path("m"), output=Path("o"), max_batch=3).resolved_max_batch(per_request) == 3
    assert BuildOptions(model=Path("m"), output=Path("o"), kv_cache="concat").resolved_max_batch(per_request) == 1
