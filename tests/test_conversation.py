"""Conversations, text-only prompts and stop sequences in the pipeline, and the scheduler
that serves many requests over one pipeline (runtime/scheduler.py)."""

from __future__ import annotations

import io
import queue
import subprocess
import sys

import pytest

from avg_edge.errors import Cancelled, InputError, LimitError
from avg_edge.model.tiny import textured_image
from avg_edge.runtime.pipeline import Pipeline
from avg_edge.runtime.sampling import SamplingParams
from avg_edge.runtime.scheduler import Request, Scheduler, cache_key
from avg_edge.runtime.text import StopText

Q = "What colour is the background?"


def _png(seed=2, w=300, h=200) -> bytes:
    buf = io.BytesIO()
    textured_image(w, h, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("pieces,stops,said,stopped", [
    (["Hello wor", "ld. Bye"], ["world"], "Hello ", True),
    (["ab", "c", "d"], ["cd"], "ab", True),
    (["a", "b", "c"], ["bd"], "abc", False),                 # a held "b" that did not become "bd" comes out
    (["x</", "s>y"], ["</s>", "zz"], "x", True),
    (["no stop here"], [], "no stop here", False),
    (["aXb", "Yc"], ["Y", "X"], "a", True),                  # the earliest stop wins
])
def test_stop_text(pieces, stops, said, stopped):
    s = StopText(stops)
    out = "".join(s.push(p) for p in pieces) + s.flush()
    assert out == said and s.stopped == stopped


def test_a_stop_sequence_cuts_the_answer(pipe):
    full = pipe.generate(_png(), Q, max_new_tokens=12)
    k = next(i for i in range(1, len(full.text) - 1) if full.text[i].strip() and full.text.find(full.text[i:i + 2]) == i)
    cut = pipe.generate(_png(), Q, max_new_tokens=12, stop=[full.text[k:k + 2]])
    assert cut.text == full.text[:k].strip() and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    with pytest.raises(InputError, match="stop: expected"):
        pipe.generate(_png(), Q, stop=["a", "b", "c", "d", "e"])


def test_text_only_prompt_runs_no_vision_and_no_router(pipe):
    p = pipe.prepare(None, "Say hello.")
    text, _ = pipe.template.render(["Say hello."], image=False)
    assert p.granularity is None and p.visual_tokens == 0 and p.router_logits is None
    assert p.embeds.shape[1] == 1 + len(pipe.tokenizer.encode(text))
    r = pipe.generate(None, "Say hello.", max_new_tokens=3)
    assert r.granularity is None and r.timings.vision == 0.0 and len(r.token_ids) <= 3
    with pytest.raises(InputError, match="has none"):
        pipe.prepare(None, "Say hello.", granularity=36)


def test_history_and_system_change_the_prompt(pipe):
    one = pipe.prepare(_png(), Q, granularity=36)
    two = pipe.prepare(_png(), "And the shape?", granularity=36, history=[Q, "blue"])
    before, after = pipe.template.render([Q, "blue", "And the shape?"])
    assert two.ids_before == one.ids_before and two.ids_after[-len(pipe.tokenizer.encode(after)):] == \
        pipe.tokenizer.encode(after)
    sys_p = pipe.prepare(_png(), Q, granularity=36, system="Be brief.")
    assert sys_p.ids_before[1:] == pipe.tokenizer.encode("Be brief. USER: ")
    late = pipe.prepare(_png(), Q, granularity=36, history=["Hi.", "Hello."], image_turn=2)
    assert pipe.tokenizer.decode(late.ids_before).endswith("Hello.</s>USER:") or "Hello." in \
        pipe.tokenizer.decode(late.ids_before)
    with pytest.raises(InputError, match="must open a user turn"):
        pipe.prepare(_png(), Q, history=["Hi.", "Hello."], image_turn=1)


def test_a_conversation_longer_than_the_context_is_a_limit(small_context_build):
    with Pipeline.load(small_context_build) as p:
        with pytest.raises(LimitError, match="context holds"):
            p.prepare(None, "why " * 400)


# -- the scheduler -------------------------------------------------------------------------
def _run(sched: Scheduler, req: Request, cancel_after: int | None = None):
    events: queue.Queue = queue.Queue()
    job = sched.submit(req, lambda kind, value: events.put((kind, value)))
    pieces = []
    while True:
        kind, value = events.get(timeout=120)
        if kind == "piece":
            pieces.append(value)
            if cancel_after is not None and len(pieces) == cancel_after:
                _run.tokens_at_cancel = job.tokens          # what the worker had decoded by then
                job.cancel()
        else:
            return pieces, kind, value


def test_scheduler_answers_like_generate_and_reuses_the_image(pipe):
    sched = Scheduler(pipe, parallel=1, image_cache=2)
    try:
        data = _png(seed=7)
        want = pipe.generate(data, Q, max_new_tokens=6)
        pieces, kind, result = _run(sched, Request(Q, image=data, image_key=cache_key(data), max_new_tokens=6))
        assert kind == "done" and result.text == want.text and result.token_ids == want.token_ids
        assert "".join(pieces).strip() == want.text and result.granularity == want.granularity
        follow = pipe.generate(data, "And the shape?", max_new_tokens=6, history=[Q, want.text or "x"])
        _, _, r2 = _run(sched, Request("And the shape?", image=data, image_key=cache_key(data), max_new_tokens=6,
                                       history=(Q, want.text or "x")))
        assert r2.token_ids == follow.token_ids and sched.image_cache_hits == 1
        sampled = pipe.generate(data, Q, max_new_tokens=6, temperature=0.8, seed=3)
        _, _, r3 = _run(sched, Request(Q, image=data, max_new_tokens=6, sampling=SamplingParams(0.8, None, None, 3)))
        assert r3.token_ids == sampled.token_ids
    finally:
        sched.close()


def test_scheduler_cancels_at_the_next_step_and_reports_errors(pipe):
    sched = Scheduler(pipe, parallel=1)
    try:
        pieces, kind, err = _run(sched, Request(Q, image=_png(), max_new_tokens=3000), cancel_after=2)
        assert kind == "error" and isinstance(err, Cancelled) and sched.active == 0
        done = int(str(err).split("after ")[1].split(" tokens")[0])
        assert done <= _run.tokens_at_cancel + 1 and sched.cancelled == 1      # within one decode step
        _, kind, err = _run(sched, Request(Q, image=b"not an image", max_new_tokens=3))
        assert kind == "error" and "cannot read image bytes" in str(err)
        _, kind, err = _run(sched, Request(Q, image=_png(), max_new_tokens=3, max_visual_tokens=1))
        assert kind == "error" and isinstance(err, LimitError)
        _, kind, result = _run(sched, Request(Q, image=_png(), max_new_tokens=3))    # still serving
        assert kind == "done" and sched.active == 0 and sched.waiting == 0
    finally:
        sched.close()


def test_scheduler_refuses_bad_settings(pipe):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InputError, match="parallel"):
            Scheduler(pipe, parallel=bad)


def test_avg_run_without_a_question_chats_over_stdin(tiny_build, tmp_path, pipe):
    img = tmp_path / "a.png"
    img.write_bytes(_png(seed=4))
    first = pipe.generate(str(img), Q, max_new_tokens=4)
    second = pipe.generate(str(img), "And the shape?", max_new_tokens=4,
                           history=[Q, first.text] if first.text else [])
    r = subprocess.run([sys.executable, "-c", "from avg_edge.cli import run_main; run_main()", str(img),
                        "-m", str(tiny_build[0]), "-n", "4"], input=f"{Q}\n\nAnd the shape?\n/bye\nignored\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == [first.text, second.text] or \
        [line.strip() for line in r.stdout.split("\n")[:2]] == [first.text, second.text]
    r = subprocess.run([sys.executable, "-c", "from avg_edge.cli import run_main; run_main()", "-",
                        "-m", str(tiny_build[0])], input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "standard input cannot carry both" in r.stderr
