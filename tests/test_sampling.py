"""Next-token choice on its own: no temperature, top_p or logits makes it crash or
return NaN probabilities; bad parameters are usage errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avg_edge.errors import BackendError, InputError, category_of
from avg_edge.runtime.sampling import GREEDY_BELOW, SamplingParams, next_token, next_tokens

LOGITS = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300, 1e-30, GREEDY_BELOW / 2])
def test_a_tiny_temperature_is_greedy(temperature):
    rng = np.random.default_rng(0)
    assert {next_token(LOGITS, SamplingParams(temperature), rng) for _ in range(20)} == {1}


@pytest.mark.parametrize("logits", [
    np.array([3e38, -3e38, 1.0], dtype=np.float32),
    np.array([np.finfo(np.float64).max, -np.finfo(np.float64).max, 0.0]),
    np.array([-np.inf, 5.0, -np.inf], dtype=np.float32),
    np.array([np.inf, 1.0, 2.0], dtype=np.float32),
])
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(GREEDY_BELOW), SamplingParams(100.0),
                                    SamplingParams(0.5, top_k=2), SamplingParams(0.5, top_p=0.1)])
def test_extreme_logits_never_give_nan(logits, params):
    with np.errstate(all="raise"):                      # no overflow or invalid warning either
        assert next_token(logits, params, np.random.default_rng(1)) == int(np.argmax(logits))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_a_failed_inference(temperature):
    with pytest.raises(BackendError, match="NaN") as e:
        next_token(np.array([1.0, np.nan], dtype=np.float32), SamplingParams(temperature), np.random.default_rng(0))
    assert category_of(e.value).name == "failed"


def test_a_batched_choice_gives_each_row_what_it_gets_alone():
    logits = np.random.default_rng(3).normal(size=(5, 50)).astype(np.float32) * 3
    params = [SamplingParams(), SamplingParams(0.8, seed=1), SamplingParams(), SamplingParams(1.5, top_k=5),
              SamplingParams(0.7, top_p=0.5)]
    alone = [next_token(row, p, np.random.default_rng(i)) for i, (row, p) in enumerate(zip(logits, params))]
    together = next_tokens(logits, params, [np.random.default_rng(i) for i in range(5)])
    assert together == alone
    assert together[0] == int(np.argmax(logits[0])) and together[2] == int(np.argmax(logits[2]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_nan_in_any_row_of_a_batched_choice_fails_it(temperature):
    logits = np.zeros((3, 4), np.float32)
    logits[1, 2] = np.nan
    with pytest.raises(BackendError, match="NaN"):
        next_tokens(logits, [SamplingParams(), SamplingParams(temperature), SamplingParams()],
                    [np.random.default_rng(i) for i in range(3)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=math.nan), "temperature: expected a finite number 0..100"),
    (dict(temperature=math.inf), "temperature: expected a finite number 0..100"),
    (dict(temperature=-1e-310), "temperature: expected a finite number 0..100"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=math.nan), "top_p: expected a number with 0 < top_p <= 1"),
    (dict(top_p=math.inf), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=True), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_bad_parameters_are_usage_errors(kwargs, match):
    with pytest.raises(InputError, match=match) as e:
        SamplingParams(**kwargs)
    assert category_of(e.value).name == "usage" and "\n" not in str(e.value)
