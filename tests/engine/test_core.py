"""Generation and the speculative scheduler: lossless output, rewinds, telemetry, edges."""

import pytest
import torch
from conftest import hf_model, noisy_copy

import sybil
from sybil.engine.core import EngineCore
from sybil.engine.sequence import Generation
from sybil.errors import SybilError
from sybil.model.kv_cache import KVCache
from sybil.sample.params import SamplingParams
from sybil.spec.adaptive import AdaptiveK
from sybil.spec.model_drafter import ModelDrafter
from sybil.weights.loader import quantize_weights
from sybil.weights.tokenizer import EOT_ID

torch.set_grad_enabled(False)
SPEC = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=2048, n_positions=128, initializer_range=0.1)
NEAR_TIE = 1e-4  # fp32 logits of a 1-token and a (k+1)-token forward differ by ~1e-6 here
N_PROMPTS, NEW = 50, 20


@pytest.fixture(scope="module")
def spec(hf_checkpoint):
    path = hf_checkpoint("spec", **SPEC)
    target = sybil.load_model(path)
    independent = sybil.load_model(hf_checkpoint("spec-draft", seed=1, **{**SPEC, "initializer_range": 0.3}))
    drafts = {"independent": independent, "self": target, "noisy": noisy_copy(target, 0.02, seed=0)}
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, SPEC["vocab_size"], (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N_PROMPTS)
    ]
    plain = [sybil.generate(target, p, NEW, stop_at_eos=False).tokens for p in prompts]
    return path, target, drafts, prompts, plain


def _top2_gap(model, seq):
    top2 = model(torch.tensor([seq]).long())[0, -1].double().topk(2).values
    return float(top2[0] - top2[1])


def _assert_same_or_near_tie(model, prompt, got, want):
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    gap = _top2_gap(model, prompt + want[:i])
    assert gap < NEAR_TIE, f"outputs differ at step {i} where the target's top-2 gap is {gap:.3g}, not a near-tie"


def test_plain_greedy_equals_transformers_generate(spec):
    path, target, _, prompts, plain = spec
    ref = hf_model(path)
    for p, mine in zip(prompts, plain):
        want = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p) :]
        _assert_same_or_near_tie(target, p, mine, want.tolist())


@pytest.mark.parametrize("draft_name, lo, hi", [("independent", 0.0, 0.1), ("noisy", 0.05, 0.85), ("self", 0.95, 1.0)])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speculative_greedy_equals_target_greedy(spec, draft_name, lo, hi, k):
    _, target, drafts, prompts, plain = spec
    drafted = accepted = 0
    for p, want in zip(prompts, plain):
        out = sybil.generate(target, p, NEW, draft=drafts[draft_name], k=k, stop_at_eos=False)
        _assert_same_or_near_tie(target, p, out.tokens, want)
        drafted += out.stats["drafted"]
        accepted += out.stats["accepted"]
    # The three drafts span the acceptance range, so rejections and full runs are both exercised.
    assert lo <= accepted / drafted <= hi


@pytest.mark.parametrize("draft", ["ngram", "auto-self"])
def test_ngram_and_auto_are_lossless_too(spec, draft):
    _, target, drafts, prompts, plain = spec
    for p, want in zip(prompts[:20], plain[:20]):
        if draft == "ngram":
            out = sybil.generate(target, p, NEW, draft="ngram", k=4, stop_at_eos=False)
        else:
            out = sybil.generate(target, p, NEW, draft=drafts["noisy"], k="auto", stop_at_eos=False)
        _assert_same_or_near_tie(target, p, out.tokens, want)


def test_rewind_leaves_caches_as_a_fresh_run_would(spec):
    """After every round, the live part of both caches equals a fresh prefill of the
    committed tokens (the target's holds all but the last one)."""
    _, target, drafts, prompts, _ = spec
    rows = [prompts[3], prompts[4]]  # two rows: each rewinds its own pointers
    drafter = ModelDrafter(drafts["noisy"], SamplingParams(), 128, batch=2)
    dec = EngineCore(target, 2, 128, drafter, k=4)
    for b, row in enumerate(rows):
        dec.add(b, Generation(prompt_ids=row), 60, SamplingParams(), None, stop_at_eos=False)
    rejections = 0
    for _ in range(8):
        rounds = dec.step()
        rejections += sum(r.accepted < r.drafted for r in rounds)
        seqs = [s.tokens for s in dec.slots]
        for model, cache in ((target, dec.cache), (drafts["noisy"], drafter.cache)):
            for b, seq in enumerate(seqs):
                n = int(cache.lengths[b])
                assert n <= len(seq) - (1 if cache is dec.cache else 0)
                fresh = KVCache.for_model(model.config, 1, 128)
                model(torch.tensor([seq[:n]]), fresh)
                assert torch.allclose(cache.k[:, b, :, :n], fresh.k[:, 0, :, :n], atol=1e-5)
                assert torch.allclose(cache.v[:, b, :, :n], fresh.v[:, 0, :, :n], atol=1e-5)
        assert dec.cache.lengths.tolist() == [len(s) - 1 for s in seqs]
    assert rejections > 0


@pytest.mark.parametrize("k", [1, 3, "auto"])
def test_telemetry_adds_up(spec, k):
    _, target, drafts, prompts, _ = spec
    out = sybil.generate(target, prompts[0], 30, draft=drafts["noisy"], k=k, stop_at_eos=False)
    s = out.stats
    assert s["accepted"] + s["rejected"] == s["drafted"]
    assert len(out.tokens) == s["accepted"] + s["target_tokens"] == 30
    assert s["target_tokens"] == s["rounds"]  # no EOS: every round commits its target token
    assert sum(s["accept_histogram"]) == s["accepted"]
    assert s["mean_accepted"] == pytest.approx(30 / s["rounds"])
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
    assert s["time_draft_s"] + s["time_verify_s"] + s["time_other_s"] == pytest.approx(s["total_s"], rel=1e-6)


def test_last_round_never_drafts_past_max_tokens(spec):
    _, target, drafts, prompts, plain = spec
    out = sybil.generate(target, prompts[1], 5, draft=drafts["self"], k=8, stop_at_eos=False)
    assert out.tokens == plain[1][:5] and out.finish_reason == "length"
    assert out.stats["drafted"] == 4  # one round: 4 drafts + the target's token


def test_context_limit_stops_with_its_reason(spec):
    _, target, drafts, _, _ = spec
    prompt = list(range(120))  # context 128
    out = sybil.generate(target, prompt, 50, draft=drafts["self"], k=8, stop_at_eos=False)
    assert len(out.tokens) == 8 and out.finish_reason == "context"
    plain = sybil.generate(target, prompt, 50, stop_at_eos=False)
    assert plain.tokens == out.tokens


def test_one_token_prompt_and_k1(spec):
    _, target, drafts, _, _ = spec
    want = sybil.generate(target, [7], 12, stop_at_eos=False).tokens
    assert sybil.generate(target, [7], 12, draft=drafts["noisy"], k=1, stop_at_eos=False).tokens == want


@pytest.mark.parametrize("k", [0, -2, 128, "seven"])
def test_bad_k_is_an_error(spec, k):
    _, target, drafts, _, _ = spec
    with pytest.raises(SybilError, match="k must be"):
        sybil.generate(target, [1, 2], 4, draft=drafts["self"], k=k)


def test_vocabulary_mismatch_is_an_error(spec, hf_checkpoint):
    _, target, _, _, _ = spec
    other = sybil.load_model(hf_checkpoint("spec-v", **{**SPEC, "vocab_size": 1000}))
    with pytest.raises(SybilError, match="vocabulary"):
        sybil.generate(target, [1, 2], 4, draft=other)


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([5000], "outside the vocabulary"), ([1] * 128, "context")])
def test_bad_prompts_are_errors(spec, prompt, message):
    with pytest.raises(SybilError, match=message):
        sybil.generate(spec[1], prompt, 4)


def test_eos_inside_an_accepted_run_stops_exactly_there(eos_checkpoint):
    model = sybil.load_model(eos_checkpoint)
    prompt = [1000, 17, 1000]
    plain = sybil.generate(model, prompt, 20)
    assert plain.finish_reason == "eos" and plain.tokens[-1] == EOT_ID
    spec = sybil.generate(model, prompt, 20, draft=model, k=8)
    assert spec.tokens == plain.tokens and spec.finish_reason == "eos"
    full = sybil.generate(model, prompt, 20, draft=model, k=8, stop_at_eos=False)
    assert len(full.tokens) == 20 and full.tokens[: len(plain.tokens)] == plain.tokens


def test_seeded_sampling_is_reproducible(spec):
    _, target, drafts, prompts, _ = spec
    runs = [
        sybil.generate(target, prompts[2], 16, temperature=0.9, top_k=50, seed=11, draft=drafts["noisy"], k=3).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = sybil.generate(target, prompts[2], 16, temperature=0.9, top_k=50, seed=12, draft=drafts["noisy"], k=3)
    assert other.tokens != runs[0]


# --- batches -------------------------------------------------------------------------

BATCH_LENGTHS = [1, 5, 40, 100, 12]


def _batch_prompts(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SPEC["vocab_size"], (n,), generator=g).tolist() for n in BATCH_LENGTHS]


@pytest.mark.parametrize("draft_name", [None, "noisy", "ngram"])
def test_each_batch_row_equals_its_solo_run(spec, draft_name):
    _, target, drafts, _, _ = spec
    prompts = _batch_prompts()
    max_new = [20, 3, 25, 40, 1]  # rows stop early at their own max; 100 + 28 fills the context (128)
    draft = drafts.get(draft_name, draft_name)
    outs = sybil.generate(target, prompts, max_new, draft=draft, k=4, stop_at_eos=False)
    assert len(outs) == len(prompts)
    for p, m, out in zip(prompts, max_new, outs):
        solo = sybil.generate(target, p, m, draft=draft, k=4, stop_at_eos=False)
        _assert_same_or_near_tie(target, p, out.tokens, solo.tokens)
        assert out.finish_reason == solo.finish_reason
    assert outs[3].finish_reason == "context" and len(outs[3].tokens) == 28
    assert [len(o.tokens) for o in outs] == [20, 3, 25, 28, 1]


def test_batch_rows_stop_at_their_own_eos(eos_checkpoint):
    model = sybil.load_model(eos_checkpoint)
    prompts = [[1000, 17, 1000], [5, 6, 7, 8], [1000], [42] * 9]
    outs = sybil.generate(model, prompts, 12, draft=model, k=3)
    for p, out in zip(prompts, outs):
        assert out.tokens == sybil.generate(model, p, 12).tokens
    assert {o.finish_reason for o in outs} >= {"eos"}


@pytest.mark.parametrize("draft_name", [None, "noisy"])
def test_per_row_seeds_reproduce_solo_samples(spec, draft_name):
    _, target, drafts, _, _ = spec
    prompts = _batch_prompts(6)
    seeds = [3, 1, 4, 1, 5]
    draft = drafts.get(draft_name)
    kw = dict(temperature=0.8, top_p=0.9, draft=draft, k=3, stop_at_eos=False)
    outs = sybil.generate(target, prompts, 10, seed=seeds, **kw)
    solo = [sybil.generate(target, p, 10, seed=s, **kw).tokens for p, s in zip(prompts, seeds)]
    assert [o.tokens for o in outs] == solo


def test_a_bad_prompt_fails_alone(spec):
    _, target, _, _, _ = spec
    prompts = [[1, 2, 3], [], [7] * 200, [9, 9]]
    outs = sybil.generate(target, prompts, 6, stop_at_eos=False)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length"]
    assert "empty" in outs[1].error and "context" in outs[2].error
    assert outs[0].tokens == sybil.generate(target, [1, 2, 3], 6, stop_at_eos=False).tokens
    assert outs[3].tokens == sybil.generate(target, [9, 9], 6, stop_at_eos=False).tokens


def test_batch_telemetry_per_row(spec):
    _, target, drafts, _, _ = spec
    outs = sybil.generate(target, _batch_prompts(7)[:3], 15, draft=drafts["noisy"], k=2, stop_at_eos=False)
    for o in outs:
        s = o.stats
        assert s["accepted"] + s["target_tokens"] == len(o.tokens) == 15
        assert s["batch_size"] == 3


def test_auto_k_first_round_measures_a_draft_step_apart_from_the_prompt_catch_up(spec):
    """The warm-up drafts in one K=1 round: it measures a draft step only because the
    draft's prompt catch-up runs (and is timed) apart from the one-token step that drafts."""
    _, target, drafts, prompts, _ = spec
    prompt = max(prompts, key=len)
    drafter = ModelDrafter(drafts["independent"], SamplingParams(), 128)
    batch = EngineCore(target, 1, 128, drafter, "auto")
    batch.add(0, Generation(prompt_ids=prompt), 40, SamplingParams(), None)
    batch.step()
    batch.step()
    c = batch.controller
    assert (c.rounds, c.verify.known, c.draft.known) == (2, True, True)
    assert drafter.catchup_s > 0


def test_a_controller_given_to_later_calls_keeps_learning_and_stays_lossless(spec):
    _, target, drafts, prompts, plain = spec
    c = AdaptiveK()
    seen = 0
    for p, want in zip(prompts[:3], plain):
        out = sybil.generate(target, p, NEW, draft=drafts["noisy"], k=c, stop_at_eos=False)
        assert out.tokens == want
        seen += out.stats["rounds"]
        assert c.rounds == seen  # the same controller ran every round of every call
    assert c.step_s is not None and c.draft_ratio is not None


def test_auto_k_falls_back_to_plain_steps_when_drafts_never_land(spec):
    """With an independent draft (acceptance ~0) every drafted token is wasted work;
    k="auto" must notice and spend most rounds as plain target steps."""
    _, target, drafts, prompts, plain = spec
    out = sybil.generate(target, prompts[0], 60, draft=drafts["independent"], k="auto", stop_at_eos=False)
    assert out.tokens == sybil.generate(target, prompts[0], 60, stop_at_eos=False).tokens
    assert out.stats["drafted"] <= 0.25 * out.stats["rounds"]


# --- lossless in every fast path: token for token, not "up to floating point" ----------

@pytest.mark.parametrize("mode", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(quantize="int8"),
                                  dict(quantize="int4"), dict(quantize="int8wo")],
                         ids=["float32", "bfloat16", "int8", "int4", "int8wo"])
def test_speculative_greedy_equals_plain_greedy_exactly_in_every_mode(spec, mode):
    path, _, _, prompts, _ = spec
    target = sybil.load_model(path, **mode)
    draft = noisy_copy(target if "quantize" not in mode else sybil.load_model(path), 0.02, seed=0)
    if "quantize" in mode:
        quantize_weights(draft, mode["quantize"])
    drafted = accepted = 0
    for p in prompts[:12]:
        plain = sybil.generate(target, p, NEW, stop_at_eos=False).tokens
        for k in (1, 4, 8):
            out = sybil.generate(target, p, NEW, draft=draft, k=k, stop_at_eos=False)
            assert out.tokens == plain, f"{mode}, k={k}: speculative output differs from plain"
            drafted += out.stats["drafted"]
            accepted += out.stats["accepted"]
    assert 0 < accepted < drafted  # both full runs and rejections were verified


def test_int8_and_reduced_vocabulary_drafts_are_lossless(spec):
    path, target, _, prompts, plain = spec
    draft = quantize_weights(noisy_copy(target, 0.02, seed=0), "int8")
    for p, want in zip(prompts[:12], plain[:12]):
        for kw in (dict(k=4), dict(k=4, draft_vocab=1024), dict(k="auto", draft_vocab=1024)):
            assert sybil.generate(target, p, NEW, draft=draft, stop_at_eos=False, **kw).tokens == want


@pytest.mark.parametrize("draft_vocab, message", [(0, "between 1 and"), (10**6, "between 1 and")])
def test_bad_draft_vocab_is_an_error(spec, draft_vocab, message):
    _, target, drafts, prompts, _ = spec
    with pytest.raises(SybilError, match=message):
        sybil.generate(target, prompts[0], 4, draft=drafts["self"], draft_vocab=draft_vocab)
    with pytest.raises(SybilError, match="model draft"):
        sybil.generate(target, prompts[0], 4, draft="ngram", draft_vocab=100)


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole-prefill", "chunked"])
@pytest.mark.parametrize("draft_name", [None, "noisy", "ngram"])
def test_rows_joining_a_running_batch_equal_their_solo_runs(spec, draft_name, chunk):
    """Batch is the round loop the server drives: rows added to free slots between
    steps, with their own sampling and seeds, give exactly their solo output
    (list equality: the CPU kernels compute rows independently), whether a joining
    prompt is prefilled at once or fed in chunks inside the running rows' rounds."""
    from sybil.engine.generate import make_drafter
    from sybil.engine.sequence import Generation

    _, target, drafts, prompts, _ = spec
    draft = drafts.get(draft_name, draft_name)
    jobs = [  # (prompt, max_new, sampling, seed), more than the 3 slots
        (prompts[i], 6 + 3 * i, SamplingParams(0.9, top_k=50) if i % 2 else SamplingParams(), 100 + i)
        for i in range(7)
    ]
    drafter = make_drafter(draft, target, SamplingParams(), 128, 3, False)
    batch = EngineCore(target, 3, 128, drafter, k=3, prefill_chunk=chunk)
    outs, waiting, steps = {}, list(range(len(jobs))), 0
    slot_job = {}
    while waiting or batch.active:
        for slot in batch.free_slots()[: 1 if steps % 2 else 2]:  # join at staggered boundaries
            if waiting:
                i = waiting.pop(0)
                p, m, sp, seed = jobs[i]
                outs[i] = Generation(prompt_ids=p)
                slot_job[slot] = i
                batch.add(slot, outs[i], m, sp, seed, stop_at_eos=False)
        batch.step()
        assert batch.prefilled <= (chunk or 0)
        steps += 1
    for i, (p, m, sp, seed) in enumerate(jobs):
        solo = sybil.generate(target, p, m, temperature=sp.temperature, top_k=sp.top_k, seed=seed,
                              draft=draft, k=3, stop_at_eos=False)
        assert outs[i].tokens == solo.tokens, f"job {i}"
    assert len(set(slot_job)) == 3  # every slot was reused


@pytest.mark.parametrize("with_draft", [False, True])
def test_a_chunked_prompt_never_stalls_the_running_rows_and_writes_a_fresh_prefills_entries(spec, with_draft):
    from sybil.engine.sequence import Generation

    target, batch, prompts = _two_slots(spec, with_draft, k=2, prefill_chunk=4)
    running = Generation(prompt_ids=prompts[0])
    batch.add(0, running, 60, SamplingParams(), None, stop_at_eos=False)
    assert batch.prefilling(0)
    while batch.prefilling(0):
        batch.step()
    long_prompt = prompts[1] + prompts[2] + prompts[3]  # over 4 chunks
    joining = Generation(prompt_ids=long_prompt)
    batch.add(1, joining, 3, SamplingParams(), None, stop_at_eos=False)
    rounds = 0
    while batch.prefilling(1):
        before = len(running.tokens)
        batch.step()
        rounds += 1
        assert len(running.tokens) > before  # the running row committed in every round
        assert batch.prefilled <= 4
    assert rounds >= (len(long_prompt) - 1) // 4
    n = len(long_prompt) - 1
    fresh = _prefilled(target, long_prompt)
    assert torch.equal(batch.cache.k[:, 1, :, :n], fresh.cache.k[:, 0, :, :n])
    assert torch.equal(batch.cache.v[:, 1, :, :n], fresh.cache.v[:, 0, :, :n])
    while batch.active:
        batch.step()
    assert running.tokens == sybil.generate(target, prompts[0], 60, stop_at_eos=False).tokens
    assert joining.tokens == sybil.generate(target, long_prompt, 3, stop_at_eos=False).tokens
    # a row cancelled while its prompt is fed stops being fed
    batch.add(1, Generation(prompt_ids=long_prompt), 3, SamplingParams(), None, stop_at_eos=False)
    batch.remove(1)
    assert not batch.prefilling(1) and not any(batch.prefilling(b) for b in range(2))


def test_k_auto_prices_each_round_with_the_prompt_tokens_it_feeds(spec):
    """The batch controller is told the prompt tokens a round feeds beside the decoding
    rows (its chunk), not all those still waiting: with all of a long prompt counted, a
    round's fixed cost looks far larger than it is, and so drafting looks cheap."""
    target, batch, prompts = _two_slots(spec, True, k="auto", prefill_chunk=4)
    told = []
    choose = batch.controller.choose
    batch.controller.choose = lambda rooms, extra=0, lags=None: told.append(extra) or choose(rooms, extra, lags)
    running = Generation(prompt_ids=prompts[0])
    batch.add(0, running, 40, SamplingParams(), None, stop_at_eos=False)
    fed, steps = [], 0
    while batch.active:
        if steps == 6:
            batch.add(1, Generation(prompt_ids=prompts[1] + prompts[2] + prompts[3]), 3, SamplingParams(), None,
                      stop_at_eos=False)
        batch.step()
        fed.append(batch.prefilled)
        steps += 1
    assert len(told) == len(fed) and told == fed
    assert sum(1 for n in fed[6:] if n == 4) >= 3  # the long prompt took several full chunks


def test_a_removed_row_frees_its_slot_and_leaves_the_others_alone(spec):
    from sybil.engine.sequence import Generation

    _, target, _, prompts, plain = spec
    batch = EngineCore(target, 2, 128)
    a, b = Generation(prompt_ids=prompts[0]), Generation(prompt_ids=prompts[1])
    batch.add(0, a, NEW, SamplingParams(), None, stop_at_eos=False)
    batch.add(1, b, NEW, SamplingParams(), None, stop_at_eos=False)
    batch.step()
    batch.remove(0)
    assert batch.free_slots() == [0]
    c = Generation(prompt_ids=prompts[2])
    batch.add(0, c, NEW, SamplingParams(), None, stop_at_eos=False)
    while batch.active:
        batch.step()
    assert b.tokens == plain[1] and c.tokens == plain[2]
    batch.add(1, Generation(prompt_ids=prompts[3]), 1, SamplingParams(), None)
    with pytest.raises(ValueError, match="busy"):
        batch.add(1, Generation(prompt_ids=prompts[4]), 1, SamplingParams(), None)


def test_auto_prices_an_unmeasured_draft_step_at_the_drafters_own_prior(spec):
    """The walkthrough's case: `--draft ngram --k auto` hardly drafted, because an
    unmeasured draft step was priced as a target step. Each drafter now brings its own
    prior (a lookup: 0; a model: its share of the bytes a step reads), which
    test_adaptive shows decides the first choices; output stays lossless."""
    from sybil.model.gpt import weight_bytes

    _, target, drafts, prompts, plain = spec
    lookup, model = AdaptiveK(), AdaptiveK()
    out = sybil.generate(target, prompts[0], NEW, draft="ngram", k=lookup, stop_at_eos=False)
    assert out.tokens == plain[0] and lookup.draft_prior == 0.0
    small = drafts["independent"]
    out = sybil.generate(target, prompts[0], NEW, draft=small, k=model, stop_at_eos=False)
    assert out.tokens == plain[0]
    assert model.draft_prior == pytest.approx(min(1.0, weight_bytes(small) / weight_bytes(target)))


# --- seeded samples that do not depend on the draft, K or the batch ---------------------

SAMPLING = [dict(temperature=0.7, top_k=50), dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_k=200,
                                                                                    top_p=0.95)]


@pytest.mark.parametrize("mode", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(quantize="int8"),
                                  dict(quantize="int4"), dict(quantize="int8wo")],
                         ids=["float32", "bfloat16", "int8", "int4", "int8wo"])
def test_a_seeded_sample_is_the_same_tokens_with_any_draft_k_and_batch(spec, mode):
    """Every position's token is drawn with noise keyed by (seed, position), so the draft,
    K, k="auto", n-gram drafting and the batch change only the speed: list equality."""
    path, _, _, prompts, _ = spec
    target = sybil.load_model(path, **mode)
    noisy = noisy_copy(target if "quantize" not in mode else sybil.load_model(path), 0.02, seed=0)
    for seed in range(4):
        for sampling in SAMPLING:
            kw = dict(seed=seed, stop_at_eos=False, **sampling)
            prompt = prompts[seed]
            want = sybil.generate(target, prompt, 16, **kw).tokens
            runs = {f"model K={k}": sybil.generate(target, prompt, 16, draft=noisy, k=k, **kw) for k in (1, 4, 8)}
            runs["auto"] = sybil.generate(target, prompt, 16, draft=noisy, k="auto", **kw)
            runs["ngram"] = sybil.generate(target, prompt, 16, draft="ngram", k=4, **kw)
            for name, out in runs.items():
                assert out.tokens == want, (seed, sampling, name)
            batch = sybil.generate(target, [prompts[9], prompt, prompts[7]], 16, draft=noisy, k=3,
                                   **{**kw, "seed": [99, seed, 98]})
            assert batch[1].tokens == want, (seed, sampling, "batch row")
    assert runs["model K=4"].stats["accepted"] > 0  # the drafts did land: speculation ran


# --- the prompt cache: a slot's earlier sequence lends its shared prefix ----------------

def _finish(batch, slot, prompt, n):
    from sybil.engine.sequence import Generation

    out = Generation(prompt_ids=prompt)
    batch.add(slot, out, n, SamplingParams(), None, stop_at_eos=False)
    while slot not in batch.free_slots():
        batch.step()
    return out


def _prefilled(target, prompt):
    """A one-slot engine holding prompt's entries as a fresh prefill writes them."""
    fresh = EngineCore(target, 1, 128)
    fresh.add(0, Generation(prompt_ids=prompt), 1, SamplingParams(), None)
    return fresh


def _score(engine, slot, prompt, top):
    """(the prompt's log-probabilities with top alternatives, the entries taken from the cache)."""
    out = Generation(prompt_ids=prompt)
    cached = engine.add(slot, out, 0, SamplingParams(), None, prompt_logprobs=top)
    return out.prompt_logprobs, cached


def _two_slots(spec, with_draft, **batch_kw):
    """A fresh target and a two-slot engine over it, with the noisy draft or none."""
    path, _, drafts, prompts, _ = spec
    target = sybil.load_model(path)
    drafter = ModelDrafter(drafts["noisy"], SamplingParams(), 128, batch=2) if with_draft else None
    return target, EngineCore(target, 2, 128, drafter, **{"k": 3, **batch_kw}), prompts


@pytest.mark.parametrize("with_draft", [False, True])
def test_a_slot_reuses_the_prefix_it_shares_and_nothing_more(spec, with_draft):
    target, batch, prompts = _two_slots(spec, with_draft)
    a = prompts[0] + prompts[1]
    first = _finish(batch, 0, a, 8)
    assert first.stats["cached_prompt_tokens"] == 0
    diverging = a[:9] + prompts[2]  # shares 9 tokens, then differs
    extending = a + first.tokens[:5]  # runs past the old prompt into what was generated
    for prompt, shared in ((diverging, 9), (extending, len(a) + 4), (prompts[3], 0)):
        assert _finish(batch, 0, a, 8).tokens == first.tokens  # the slot holds a and its tokens again
        out = _finish(batch, 0, prompt, 8)
        assert out.stats["cached_prompt_tokens"] == shared
        assert out.tokens == sybil.generate(target, prompt, 8, stop_at_eos=False).tokens
        n = len(prompt) - 1
        assert _finish(batch, 0, prompt, 1).stats["cached_prompt_tokens"] == n  # the same prompt again: all of it
        # the entries are the ones a fresh prefill writes, bit for bit
        fresh = _prefilled(target, prompt)
        assert torch.equal(batch.cache.k[:, 0, :, :n], fresh.cache.k[:, 0, :, :n])
        assert torch.equal(batch.cache.v[:, 0, :, :n], fresh.cache.v[:, 0, :, :n])


def test_a_request_goes_to_the_free_slot_holding_most_of_its_prompt(spec):
    path, _, _, prompts, _ = spec
    batch = EngineCore(sybil.load_model(path), 3, 128)
    for slot in (0, 1):
        _finish(batch, slot, prompts[slot] * 2, 4)
    assert batch.best_slot(prompts[1] * 2 + prompts[3], [0, 1, 2]) == 1
    assert batch.best_slot(prompts[4], [0, 1, 2]) == 2  # nothing shared: the slot that holds nothing
    assert batch.best_slot(prompts[4], [0, 1]) == 0  # then the one taken longest ago
    assert batch.best_slot(prompts[1] * 2, [0, 2]) == 2  # nothing shared with 0 either: the empty one
    _finish(batch, 0, prompts[5], 4)
    assert batch.best_slot(prompts[4], [0, 1]) == 1


def test_one_client_alternating_two_prompts_finds_each_cached(spec):
    """Each request to the free slot best_slot picks, as the server's scheduler does: a
    prompt sharing nothing must not evict the sequence that just ended."""
    path, _, _, prompts, _ = spec
    batch = EngineCore(sybil.load_model(path), 2, 128)
    a, b = prompts[0] + prompts[1], prompts[2] + prompts[3]
    cached = []
    for prompt in (a, b, a, b, a):
        out = _finish(batch, batch.best_slot(prompt, batch.free_slots()), prompt, 4)
        cached.append(out.stats["cached_prompt_tokens"])
    assert cached == [0, 0, len(a) - 1, len(b) - 1, len(a) - 1]


@pytest.mark.parametrize("with_draft", [False, True])
def test_a_prefix_held_by_another_busy_slot_is_copied_not_recomputed(spec, with_draft):
    target, batch, prompts = _two_slots(spec, with_draft)
    context = prompts[0] + prompts[1]
    from sybil.engine.sequence import Generation

    running = Generation(prompt_ids=context)
    batch.add(0, running, 12, SamplingParams(), None, stop_at_eos=False)
    batch.step()  # slot 0 is busy: its prompt's entries are valid
    joining = Generation(prompt_ids=context + prompts[2])
    cached = batch.add(1, joining, 8, SamplingParams(), None, stop_at_eos=False)
    assert cached == len(context)
    n = len(joining.prompt_ids) - 1
    fresh = _prefilled(target, joining.prompt_ids)
    assert torch.equal(batch.cache.k[:, 1, :, :n], fresh.cache.k[:, 0, :, :n])
    while batch.active:
        batch.step()
    assert running.tokens == sybil.generate(target, context, 12, stop_at_eos=False).tokens
    assert joining.tokens == sybil.generate(target, joining.prompt_ids, 8, stop_at_eos=False).tokens


def test_a_scored_prefix_is_not_scored_again_and_its_log_probabilities_are_the_same(spec):
    """lm-evaluation-harness scores one context once per answer: the second request reuses
    the first's entries and log-probabilities, and gets what a fresh scoring gives."""
    path, _, _, prompts, _ = spec
    target = sybil.load_model(path)
    context = prompts[0] + prompts[1]
    dec = EngineCore(target, 2, 128)
    _score(dec, 0, context + prompts[2][:3], 2)
    for answer, top, shared in ((prompts[3][:4], 2, len(context)), (prompts[4][:2], 1, 0)):
        got, cached = _score(dec, 1, context + answer, top)
        assert cached == shared  # other alternatives asked: scored afresh
        assert got == _score(EngineCore(target, 1, 128), 0, context + answer, top)[0]
