"""Acceptance rules: greedy, and the position-keyed sampling rule, whose output follows the
target's distribution (chi-square over many seeds, one seeded row per sample) and fails
the same check when the noise is not keyed by position."""


import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import sybil
import sybil.engine.core
import sybil.sample.accept
from sybil.sample.accept import accept_greedy, accept_keyed
from sybil.sample.keyed import keyed_token, position_noise
from sybil.sample.params import SamplingParams, probs_from_logits

torch.set_grad_enabled(False)
TINY = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=8, n_positions=16, initializer_range=0.6)
PROMPT, NEW, N_SAMPLES = [1, 2], 3, 2000
BATCH = 100  # rows per generate call: a row's sample is its solo run's (tests/engine/test_core.py), 5x faster
P_OK, P_BROKEN = 1e-3, 1e-6  # fixed seeds: each test's p-value is the same on every run


def test_accept_greedy():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 9]):
        logits[row, best] = 1.0
    assert accept_greedy([3, 5, 7], logits) == (3, 9)  # all accepted, bonus token
    assert accept_greedy([3, 6, 7], logits) == (1, 5)  # second rejected, target's own token
    assert accept_greedy([], logits[:1]) == (0, 3)  # plain step


def test_one_position_output_is_distributed_as_p():
    """The draft proposes by q with a position's noise, the target chooses by p with the
    same noise: over seeds, the emitted token is distributed exactly as p, and the draft
    is kept at least (1 - TV) / (1 + TV) of the time."""
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = probs_from_logits(p_logits[0], params).double()
    q = torch.tensor([0.05, 0.05, 0.6, 0.1, 0.2])
    counts, kept = np.zeros(5), 0
    for seed in range(20000):
        x = keyed_token(q, seed, 7)
        n, tok = accept_keyed([x], p_logits, params, seed, 7)
        counts[x if n == 1 else tok] += 1
        kept += n
    assert chisquare(counts, p.numpy() / p.sum().item() * counts.sum()).pvalue > P_OK
    tv = 0.5 * float((p - q.double()).abs().sum())
    assert kept / 20000 > (1 - tv) / (1 + tv)


def test_the_noise_is_keyed_by_seed_and_position_alone():
    a, b = position_noise(3, 10, 50), position_noise(3, 10, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, position_noise(3, 11, 50)) and not torch.equal(a, position_noise(4, 10, 50))


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    target = sybil.load_model(hf_checkpoint("tiny-target", seed=3, **TINY))
    draft = sybil.load_model(hf_checkpoint("tiny-draft", seed=4, **TINY))
    return target, draft


def _exact(target, params):
    """P(continuation) for every continuation of NEW tokens, by enumeration."""
    V = TINY["vocab_size"]
    probs = {(): 1.0}
    for _ in range(NEW):
        prefixes = list(probs)
        logits = target(torch.tensor([PROMPT + list(c) for c in prefixes]))[:, -1]
        nxt = probs_from_logits(logits, params)
        probs = {c + (t,): probs[c] * float(nxt[i, t]) for i, c in enumerate(prefixes) for t in range(V)}
    return probs


def _chi2_pvalue(target, draft, params, k, **kw):
    exact = _exact(target, params)
    seen: dict[tuple, int] = {}
    for first in range(0, N_SAMPLES, BATCH):  # one seeded row per sample, BATCH rows per call
        seeds = list(range(first, min(first + BATCH, N_SAMPLES)))
        outs = sybil.generate(target, [PROMPT] * len(seeds), NEW, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, seed=seeds, stop_at_eos=False,
                              draft=draft, k=k, **kw)
        for out in outs:
            seen[tuple(out.tokens)] = seen.get(tuple(out.tokens), 0) + 1
    assert set(seen) <= {c for c, p in exact.items() if p > 0}, "sampled a continuation the target forbids"
    # Pool the rare continuations into one bin so every expected count is >= 5.
    cells = sorted((c for c in exact if exact[c] > 0), key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * N_SAMPLES >= 5]
    rest = [c for c in cells if exact[c] * N_SAMPLES < 5]
    obs = [seen.get(c, 0) for c in big] + [sum(seen.get(c, 0) for c in rest)] * bool(rest)
    exp = [exact[c] * N_SAMPLES for c in big] + [sum(exact[c] for c in rest) * N_SAMPLES] * bool(rest)
    assert len(big) >= 10
    p = chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue
    print(f"chi-square p = {p:.3g} over {len(obs)} bins")
    return p


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
]


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7-topk4", "t1.3-topp0.8"])
def test_speculative_samples_follow_the_target_distribution(tiny, params):
    target, draft = tiny
    assert _chi2_pvalue(target, draft, params, k=2) > P_OK


def test_ngram_drafts_preserve_the_distribution(tiny):
    target, _ = tiny
    assert _chi2_pvalue(target, "ngram", SETTINGS[0], k=2) > P_OK


def test_the_chi_square_check_rejects_noise_that_is_not_keyed_by_position(tiny, monkeypatch):
    """The mistake this rule invites: one noise vector for every position of a sequence.
    Each position alone is still a draw from its distribution, but consecutive tokens
    are coupled, so the joint distribution of a continuation is wrong."""
    real = sybil.sample.accept.keyed_token
    monkeypatch.setattr(sybil.sample.accept, "keyed_token", lambda probs, seed, position: real(probs, seed, 0))
    target, draft = tiny
    assert _chi2_pvalue(target, draft, SETTINGS[0], k=2) < P_BROKEN


def test_int8_draft_preserves_the_distribution(tiny):
    """Weight-only int8: the tiny model's width (16) is below the integer paths' blocks of 32."""
    import copy

    from sybil.weights.loader import quantize_weights

    target, draft = tiny
    assert _chi2_pvalue(target, quantize_weights(copy.deepcopy(draft), "int8wo"), SETTINGS[0], k=2) > P_OK


@pytest.mark.parametrize("params", SETTINGS[:2], ids=["t1", "t0.7-topk4"])
def test_reduced_vocabulary_draft_preserves_the_distribution(tiny, params):
    """The draft proposes only ids 0..3 and the last id (7) out of 8; the output must still
    follow the target's distribution over all 8."""
    target, draft = tiny
    assert _chi2_pvalue(target, draft, params, k=2, draft_vocab=4) > P_OK
