import torch

import sybil
from sybil.sample.params import SamplingParams
from sybil.spec.model_drafter import ModelDrafter
from sybil.spec.ngram import NgramDrafter

torch.set_grad_enabled(False)


def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3)
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # Last bigram (6, 7) occurred twice before; the latest one was followed by 2, 3.
    assert d.lookup(seq, 3).tokens == [2, 3, 6]
    assert d.lookup(seq, 1).tokens == [2]
    assert d.lookup([1, 2, 3, 4], 4).tokens == []  # 4 never seen before
    assert d.lookup([9, 4, 9], 2).tokens == [4, 9]  # unigram fallback
    assert d.lookup(seq, 0).tokens == []
    assert [p.tokens for p in d.propose([seq, [9, 4, 9]], [1, 2], [None, None])] == [[2], [4, 9]]


def test_model_drafter_is_greedy_decoding_and_rewinds(hf_checkpoint):
    model = sybil.load_model(hf_checkpoint("small"))
    d = ModelDrafter(model, SamplingParams(), 64, batch=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    props = d.propose(prompts, [4, 2], [None, None])
    for prompt, prop, k in zip(prompts, props, [4, 2]):
        assert prop.tokens == sybil.generate(model, prompt, k, stop_at_eos=False).tokens
    assert d.cache.lengths.tolist() == [5 + 3, 2 + 1]  # the last draft is never fed
    d.rewind([6, 99])
    assert d.cache.lengths.tolist() == [6, 3]


def test_model_drafter_confidence_stop(hf_checkpoint):
    model = sybil.load_model(hf_checkpoint("small"))
    d = ModelDrafter(model, SamplingParams(), 64, min_confidence=0.999)
    # A random model is never 99.9% sure: one token, then it stops.
    assert len(d.propose([[1, 2, 3]], [6], [None])[0].tokens) == 1


def test_reduced_vocabulary_drafter_proposes_only_from_its_subset(hf_checkpoint):
    """A sampled row drafts by its position-keyed noise on the draft's distribution,
    which a reduced head renormalises on its subset: no proposal falls outside it."""
    model = sybil.load_model(hf_checkpoint("small"))
    last = model.config.vocab_size - 1
    full = ModelDrafter(model, SamplingParams(temperature=1.0), 64)
    part = ModelDrafter(model, SamplingParams(temperature=1.0), 64, vocab=300)
    seen_full, seen_part = set(), set()
    for seed in range(20):
        seen_full |= set(full.propose([[5, 6, 7]], [4], [seed])[0].tokens)
        full.rewind([0])
        prop = part.propose([[5, 6, 7]], [4], [seed])[0]
        part.rewind([0])
        assert len(prop.tokens) == 4  # deterministic given the seed
        seen_part |= set(prop.tokens)
    assert seen_part <= set(range(300)) | {last}
    assert any(t >= 300 for t in seen_full)  # the full head does propose outside it
