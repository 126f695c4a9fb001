import pytest
import torch

from sybil.sample.keyed import keyed_token
from sybil.sample.params import SamplingParams, probs_from_logits


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0])
    assert probs_from_logits(logits, SamplingParams()).tolist() == [0.0, 1.0, 0.0]



def test_a_keyed_draw_never_takes_a_token_outside_top_k_and_follows_the_seed():
    probs = probs_from_logits(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingParams(1.0, top_k=2))
    draws = [keyed_token(probs, seed, 3) for seed in range(200)]
    assert set(draws) == {0, 1}
    assert draws == [keyed_token(probs, seed, 3) for seed in range(200)]
    assert 0.5 < draws.count(0) / 200 < 0.75  # 0.625 expected


def test_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(probs_from_logits(logits, SamplingParams(1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k2 = probs_from_logits(logits, SamplingParams(1.0, top_k=2))
    assert torch.allclose(k2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it
    p = probs_from_logits(logits, SamplingParams(1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    cold = probs_from_logits(logits, SamplingParams(0.5))
    assert torch.allclose(cold, torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)


def test_top_p_keeps_at_least_one_token():
    p = probs_from_logits(torch.tensor([5.0, 0.0, 0.0]), SamplingParams(1.0, top_p=0.01))
    assert p.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.2)])
def test_bad_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_a_top_p_that_underflows_float32_still_keeps_the_top_token():
    """5e-324 is a valid top_p (> 0) that is 0 in float32: the top token stays (found by schemathesis)."""
    p = probs_from_logits(torch.tensor([[0.0, 3.0, 1.0]]), SamplingParams(1.0, top_p=5e-324))
    assert p.tolist() == [[0.0, 1.0, 0.0]]
