"""sybil.sample.logprobs (and sybil.engine.scoring) and what the engine reports with it: prompt and generated
log-probabilities against transformers' log-softmax, the same bits with a draft as
without, logit_bias and penalties against a reference loop, and the sliding windows
against a transformers computation written here."""

import math

import pytest
import torch
from conftest import hf_model, hf_sliding, noisy_copy, reference_greedy

import sybil
from sybil.engine.scoring import sliding_nll, windows
from sybil.weights.tokenizer import encode

torch.set_grad_enabled(False)

PROMPT = encode("The history of the city begins with a small settlement on the river, and")


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    path = hf_checkpoint("small")
    model = sybil.load_model(path, torch.float32)
    return hf_model(path), model, noisy_copy(model, 0.002, seed=1)  # a draft that mostly agrees


@pytest.mark.parametrize("n, context, stride", [(2, 4, 1), (10, 4, 2), (11, 4, 3), (100, 16, 5), (7, 16, 8),
                                                (64, 8, 7), (33, 32, 31)])
def test_windows_score_every_token_but_the_first_exactly_once(n, context, stride):
    plan = windows(n, context, stride)
    scored = [t for w in plan for t in range(w.first, w.end)]
    assert scored == list(range(1, n))
    for i, w in enumerate(plan):
        assert w.begin == i * stride and w.end - w.begin <= context and w.begin < w.first <= w.end


@pytest.mark.parametrize("stride", [0, 8, 9])
def test_windows_refuse_a_stride_that_is_not_below_the_context(stride):
    with pytest.raises(ValueError, match="stride"):
        windows(20, 8, stride)


@pytest.mark.parametrize("context, stride, batch", [(64, 32, 1), (64, 48, 3), (256, 100, 2)])
def test_sliding_nll_equals_transformers(models, context, stride, batch):
    hf, model, _ = models
    ids = (encode("It was the best of times, it was the worst of times, it was the age of wisdom. ") * 12)[:301]
    nll, count = sliding_nll(model, ids, context, stride, batch)
    ref, ref_count = hf_sliding(hf, ids, context, stride)
    assert count == ref_count == len(ids) - 1
    assert math.isclose(nll, ref, rel_tol=1e-5)


def test_prompt_logprobs_equal_transformers_log_softmax(models):
    hf, model, _ = models
    out = sybil.generate(model, PROMPT, 0, prompt_logprobs=5)
    assert out.tokens == [] and out.finish_reason == "length"
    lp = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for j, e in enumerate(out.prompt_logprobs[1:], 1):
        assert e.token == PROMPT[j]
        assert abs(e.logprob - float(lp[j - 1, PROMPT[j]])) < 1e-4
        want = torch.topk(lp[j - 1], 5)
        assert [t for t, _ in e.top] == want.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(e.top, want.values.tolist())) < 1e-4


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generated_logprobs_are_the_same_bits_with_a_draft(models, temperature):
    """Each generated token's log-probability comes from the logits it was chosen from:
    a verify's are a step's bits, so speculative and plain decoding report the same
    (sampled too: a seeded sample does not depend on the draft)."""
    _, model, draft = models
    kw = dict(temperature=temperature, seed=3, logprobs=4, stop_at_eos=False)
    plain = sybil.generate(model, PROMPT, 24, **kw)
    runs = [plain, sybil.generate(model, PROMPT, 24, draft=draft, k=3, **kw)]
    runs.append(sybil.generate(model, PROMPT, 24, draft="ngram", k=4, **kw))
    assert runs[1].stats["accepted"] > 0
    lp = torch.log_softmax(model(torch.tensor([PROMPT + plain.tokens])).float()[0], -1)
    for out in runs:
        assert len(out.logprobs) == len(out.tokens) == 24
        assert [e.token for e in out.logprobs] == out.tokens
        # against a full forward of the sequence (not the same kernels: a tolerance)
        for i, e in enumerate(out.logprobs):
            assert abs(e.logprob - float(lp[len(PROMPT) + i - 1, out.tokens[i]])) < 1e-4
    for out in runs[1:]:  # a seeded sample is the same tokens whatever drafts, as greedy output is
        assert out.tokens == plain.tokens
        assert [(e.logprob, e.top) for e in out.logprobs] == [(e.logprob, e.top) for e in plain.logprobs]


def test_logprobs_of_a_speculative_sample_are_its_own_tokens_exactly(models):
    """Sampled with a draft, each token's logprob equals the plain step's on the same prefix."""
    _, model, draft = models
    out = sybil.generate(model, PROMPT, 16, temperature=0.9, seed=11, draft=draft, k=3, logprobs=2, stop_at_eos=False)
    for i in range(len(out.tokens)):
        step = sybil.generate(model, PROMPT + out.tokens[:i], 1, logprobs=2, logit_bias={out.tokens[i]: 100})
        assert step.tokens == [out.tokens[i]]
        assert (step.logprobs[0].logprob, step.logprobs[0].top) == (out.logprobs[i].logprob, out.logprobs[i].top)


ADJUST = [
    dict(logit_bias={13: 4.0, 262: 3.0}),
    dict(logit_bias={11: -100.0}, presence=1.5),
    dict(frequency=2.0),
    dict(presence=-2.0, frequency=0.5, logit_bias={290: 2.5}),
]


@pytest.mark.parametrize("adjust", ADJUST, ids=["bias", "ban + presence", "frequency", "all three"])
@pytest.mark.parametrize("draft", [None, "model", "ngram"])
def test_logit_bias_and_penalties_equal_a_reference_loop(models, adjust, draft):
    hf, model, noisy = models
    want = reference_greedy(hf, PROMPT, 20, adjust.get("logit_bias"), adjust.get("presence", 0.0),
                            adjust.get("frequency", 0.0))
    assert want != reference_greedy(hf, PROMPT, 20)  # the adjustment changes the output
    d = {None: None, "model": noisy, "ngram": "ngram"}[draft]
    out = sybil.generate(model, PROMPT, 20, stop_at_eos=False, draft=d, k=3, logit_bias=adjust.get("logit_bias"),
                         presence_penalty=adjust.get("presence", 0.0), frequency_penalty=adjust.get("frequency", 0.0))
    assert out.tokens == want


def test_a_seeded_sample_with_adjustments_equals_the_loop_that_samples_the_same_way(models):
    """A seeded sample with bias and penalties draws as a loop that adjusts, applies
    temperature and top-k, and takes each position's position-keyed Gumbel draw; with
    a draft too."""
    from sybil.sample.keyed import keyed_token
    from sybil.sample.params import SamplingParams, adjust_logits, probs_from_logits

    _, model, draft = models
    params = SamplingParams(0.9, 40, None, ((13, 3.0),), 0.7, 0.4)
    kw = dict(temperature=0.9, top_k=40, seed=5, logit_bias={13: 3.0}, presence_penalty=0.7, frequency_penalty=0.4,
              stop_at_eos=False)
    out = sybil.generate(model, PROMPT, 16, **kw)
    seq, counts = list(PROMPT), torch.zeros(model.config.vocab_size)
    for _ in range(16):
        logits = model(torch.tensor([seq]))[0, -1:]
        tok = keyed_token(probs_from_logits(adjust_logits(logits, params, counts), params)[0], 5, len(seq))
        seq.append(tok)
        counts[tok] += 1
    assert out.tokens == seq[len(PROMPT):]
    assert sybil.generate(model, PROMPT, 16, draft=draft, k=3, **kw).tokens == out.tokens


@pytest.mark.parametrize("kw, match", [
    (dict(logprobs=21), "logprobs"), (dict(logit_bias={50257: 1.0}), "vocabulary"),
    (dict(logit_bias={5: 101.0}), "logit_bias"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
])
def test_bad_adjustments_are_errors(models, kw, match):
    with pytest.raises(sybil.SybilError, match=match):
        sybil.generate(models[1], PROMPT, 4, **kw)
