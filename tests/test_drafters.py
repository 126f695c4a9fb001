import torch

from sybil.drafters import ModelDrafter, NgramDrafter
from sybil.kv_cache import KVCache
from sybil.sampling import SamplingParams

import sybil

torch.set_grad_enabled(False)


def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3)
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # Last bigram (6, 7) occurred twice before; the latest one was followed by 2, 3.
    assert d.propose(seq, 3).tokens == [2, 3, 6]
    assert d.propose(seq, 1).tokens == [2]
    assert d.propose([1, 2, 3, 4], 4).tokens == []  # 4 never seen before
    assert d.propose([9, 4, 9], 2).tokens == [4, 9]  # unigram fallback
    assert d.propose(seq, 0).tokens == []


def test_model_drafter_is_greedy_decoding_and_rewinds(hf_checkpoint):
    model = sybil.load_model(hf_checkpoint("small"))
    d = ModelDrafter(model, SamplingParams(), 64)
    prompt = [3, 1, 4, 1, 5]
    prop = d.propose(prompt, 4, None)
    want = sybil.generate(model, prompt, 4, stop_at_eos=False).tokens
    assert prop.tokens == want and prop.probs is None
    assert int(d.cache.lengths[0]) == len(prompt) + 3  # the last draft is never fed
    d.rewind(len(prompt) + 1)
    assert int(d.cache.lengths[0]) == len(prompt) + 1


def test_model_drafter_confidence_stop(hf_checkpoint):
    model = sybil.load_model(hf_checkpoint("small"))
    d = ModelDrafter(model, SamplingParams(), 64, min_confidence=0.999)
    # A random model is never 99.9% sure: one token, then it stops.
    assert len(d.propose([1, 2, 3], 6, None).tokens) == 1
