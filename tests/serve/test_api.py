"""The OpenAI-compatible server, driven over HTTP by the official `openai` client and
httpx: every answer equals a solo sybil.generate call with the same parameters, and
every bad request gets its status and OpenAI's error body."""

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import Server

import sybil
from sybil.weights.tokenizer import EOT_ID, decode, encode

openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
torch.set_grad_enabled(False)

K = 3
NAME = "small"
CONTEXT = 256
PROMPTS = ["The quick brown fox", "Once upon a time", "In 1905, Einstein", "Hello", "A B C D E F G",
           "The capital of France is", "def main():", "1, 2, 3, 4,", "She said", "Rain", "GPT-2 is", "Yes."]


@pytest.fixture(scope="module")
def ckpts(hf_checkpoint, noisy_checkpoint):
    return hf_checkpoint("small"), noisy_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory, ckpts):
    target, draft = ckpts
    srv = Server(tmp_path_factory.mktemp("srv"), "--model", str(target), "--draft", str(draft), "--k", str(K),
                 "--draft-quantize", "none", "--dtype", "float32", "--max-batch", "4", "--max-queue", "16",
                 "--served-model-name", NAME)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def local(ckpts):
    """The same target and draft in this process: the solo runs to compare with."""
    target, draft = ckpts
    return sybil.load_model(target, torch.float32), sybil.load_model(draft, torch.float32)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def solo(local, prompt_ids, max_tokens=16, temperature=1.0, top_p=1.0, top_k=None, seed=None, ignore_eos=False,
         stop=()):
    """What the server must answer: sybil.generate alone, then the text cut before a stop string."""
    target, draft = local
    out = sybil.generate(target, prompt_ids, max_tokens, temperature=temperature, top_p=top_p if top_p < 1 else None,
                         top_k=top_k, seed=seed, stop_at_eos=not ignore_eos, draft=draft, k=K)
    tokens = out.tokens
    text = decode([t for t in tokens if t != EOT_ID])
    cuts = [text.find(s) for s in stop if text.find(s) >= 0]
    finish = "stop" if out.finish_reason == "eos" else "length"
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return text, tokens, finish


def test_models_health_and_a_greedy_completion(client, server, local):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                  extra_body={"return_token_ids": True})
    text, tokens, finish = solo(local, encode(PROMPTS[0]), 20, temperature=0)
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (text, finish)
    assert c.model_extra["token_ids"] == tokens
    assert c.model_extra["prompt_token_ids"] == encode(PROMPTS[0])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(encode(PROMPTS[0])), len(tokens))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_stream_equals_the_solo_run(client, local):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    text, tokens, _ = solo(local, encode(PROMPTS[1]), 30, temperature=0, ignore_eos=True)
    usage = chunks.pop()  # with include_usage, a last chunk carries usage and no choices
    assert usage.choices == [] and usage.usage.completion_tokens == 30
    assert usage.usage.prompt_tokens == len(encode(PROMPTS[1]))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == tokens
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len(chunks) > 2  # sent as rounds commit, not all at the end


def test_twelve_concurrent_requests_each_equal_their_solo_run(client, local):
    def request(i):
        kw = dict(max_tokens=5 + 7 * (i % 4), temperature=0.0 if i % 2 else 0.9, seed=i, top_p=0.95,
                  extra_body={"top_k": 50, "ignore_eos": True})
        if i % 3 == 0:
            pieces = client.completions.create(model=NAME, prompt=PROMPTS[i], stream=True, **kw)
            return "".join(c.choices[0].text for c in pieces)
        return client.completions.create(model=NAME, prompt=PROMPTS[i], **kw).choices[0].text

    results = [None] * 12
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, request(i))) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(12):
        want, _, _ = solo(local, encode(PROMPTS[i]), 5 + 7 * (i % 4), temperature=0.0 if i % 2 else 0.9, seed=i,
                          top_p=0.95, top_k=50, ignore_eos=True)
        assert results[i] == want, f"request {i}"


def test_seeded_sampling_reproduces_and_unseeded_varies(client, local):
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b == solo(local, encode(PROMPTS[2]), 24, temperature=1.0, seed=1234, ignore_eos=True)[0]
    others = {client.completions.create(**kw).choices[0].text for _ in range(3)}
    assert len(others | {a}) > 1


def test_stop_strings_end_the_text_before_them(client, local):
    full, _, _ = solo(local, encode(PROMPTS[5]), 40, temperature=0, ignore_eos=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=PROMPTS[5], max_tokens=40, temperature=0, stop=[stop, "\x00"],
                                      stream=stream, extra_body={"ignore_eos": True})
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[: full.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_prompt_forms_give_one_choice_each(client, local):
    ids = encode(PROMPTS[3])
    for prompt in (ids, [ids, encode(PROMPTS[4])], [PROMPTS[3], PROMPTS[4]]):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        many = isinstance(prompt[0], (list, str))
        assert len(r.choices) == (2 if many else 1)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        assert r.choices[0].text == solo(local, ids, 6, temperature=0)[0]
        if many:
            assert r.choices[1].text == solo(local, encode(PROMPTS[4]), 6, temperature=0)[0]


BAD = [
    ("malformed JSON", b'{"prompt": "hi", ', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("temperature below 0", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top_p above 1", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("token id outside the vocabulary", {"prompt": [15496, 50257]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1]}, 400, "prompt"),
    ("a boolean as a token", {"prompt": [[False]]}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("prompt and max_tokens past the context", {"prompt": [1] * 250, "max_tokens": 7}, 400, "max_tokens"),
    ("prompt alone fills the context", {"prompt": [1] * CONTEXT}, 400, "prompt"),
    ("n 0", {"prompt": "hi", "n": 0}, 400, "n"),
    ("n x prompts past the server's room", {"prompt": "hi", "n": 30}, 400, "n"),
    ("logprobs 21", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("negative logprobs", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("a bias above 100", {"prompt": "hi", "logit_bias": {"15": 101}}, 400, "logit_bias"),
    ("a bias below -100", {"prompt": "hi", "logit_bias": {"15": -100.5}}, 400, "logit_bias"),
    ("a bias on an unknown id", {"prompt": "hi", "logit_bias": {"50257": 1}}, 400, "logit_bias"),
    ("a bias on a non-id key", {"prompt": "hi", "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ("presence_penalty above 2", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency_penalty below -2", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("max_tokens 0 without echo", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("best_of 2", {"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ("a string max_tokens", {"prompt": "hi", "max_tokens": "7"}, 400, "max_tokens"),
    ("a huge seed", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("unknown model", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_an_openai_error_body(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_bad_requests_never_disturb_a_running_row(client, server, local):
    stream = client.completions.create(model=NAME, prompt=PROMPTS[6], max_tokens=60, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    pieces = [next(iter(stream)).choices[0].text]
    for _, body, status, _ in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert httpx.post(server.url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"}).status_code == status
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == solo(local, encode(PROMPTS[6]), 60, temperature=0, ignore_eos=True)[0]


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_dropped_stream_frees_its_slot_and_the_server_stays_healthy(client, server, local):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[7], "max_tokens": 250, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 20
    while _metric(server, "sybil_running_requests") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "sybil_running_requests") == 0
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.completions.create(model=NAME, prompt=PROMPTS[8], max_tokens=8, temperature=0)
    assert r.choices[0].text == solo(local, encode(PROMPTS[8]), 8, temperature=0)[0]


def test_metrics_count_requests_tokens_and_drafts(server, client):
    before = _metric(server, "sybil_generated_tokens_total")
    client.completions.create(model=NAME, prompt=PROMPTS[9], max_tokens=10, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    assert _metric(server, "sybil_generated_tokens_total") == before + 10
    assert _metric(server, 'sybil_requests_total{status="200"}') >= 1
    assert _metric(server, 'sybil_requests_total{status="400"}') >= 1
    assert _metric(server, "sybil_draft_tokens_total") >= _metric(server, "sybil_accepted_tokens_total") > 0
    for name in ("sybil_queued_requests", "sybil_time_to_first_token_seconds_bucket",
                 "sybil_inter_token_latency_seconds_bucket"):
        assert name in text


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """A bounded property-based run against the server's own OpenAPI schema."""
    exe = [sys.executable, "-m", "schemathesis.cli"]
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        pytest.skip("schemathesis is a test dependency; not installed")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    r = subprocess.run([*exe, "run", server.url + "/openapi.json", "--checks", checks, "--max-examples", "25",
                        "--seed", "1", "--generation-database", "none", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache stays there
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout


def test_overflow_gets_429_while_accepted_requests_finish(tmp_path, ckpts, local):
    target, _ = ckpts
    srv = Server(tmp_path, "--model", str(target), "--dtype", "float32", "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"prompt": PROMPTS[10], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        results = {}

        def post(i):
            results[i] = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in results.values())
        assert codes.count(200) >= 2 and 429 in codes, codes
        target_m, _ = local
        want = decode(sybil.generate(target_m, encode(PROMPTS[10]), 200, stop_at_eos=False).tokens)
        for r in results.values():
            if r.status_code == 429:
                assert r.headers["retry-after"].isdigit()
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["text"] == want
    finally:
        assert srv.stop() == 0


# ---- the evaluation fields: logprobs, echo, n, logit_bias, penalties, stops; the tokenizer routes

def plain(local, ids, n, **kw):
    """The target alone (no draft), greedy unless told: what speculation must reproduce."""
    return sybil.generate(local[0], ids, n, **kw)


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(client, ckpts, local):
    from conftest import hf_model

    ids = encode(PROMPTS[5] + " Paris, and the capital of Spain is")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=3)
    c = r.choices[0]
    gen = plain(local, ids, 3, logprobs=3)
    assert c.text == decode(ids) + decode(gen.tokens)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert lp.tokens == [decode([t]) for t in ids + gen.tokens]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(hf_model(ckpts[0])(torch.tensor([ids + gen.tokens])).logits[0].double(), -1)
    for j in range(1, len(ids) + 3):
        assert abs(lp.token_logprobs[j] - float(ref[j - 1, (ids + gen.tokens)[j]])) < 1e-4
        assert len(lp.top_logprobs[j]) <= 4 and lp.tokens[j] in lp.top_logprobs[j]
    # the generated tokens' numbers are plain decoding's, exactly, though the server drafts
    assert lp.token_logprobs[len(ids):] == [e.logprob for e in gen.logprobs]
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs_only(server):
    ids = encode(PROMPTS[2])
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"prompt": [ids, encode(PROMPTS[3])], "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert [c["text"] for c in r["choices"]] == [PROMPTS[2], PROMPTS[3]]
    first = r["choices"][0]["logprobs"]
    assert len(first["token_logprobs"]) == len(ids) and first["token_logprobs"][0] is None
    assert all(len(top) == 1 for top in first["top_logprobs"][1:])  # logprobs 0: the chosen token only
    assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "length"
    # the whole context may be prompt when nothing is generated
    full = httpx.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": [1] * CONTEXT, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == CONTEXT


def test_a_stream_with_logprobs_carries_the_same_numbers(client, local):
    ids = encode(PROMPTS[0])
    chunks = list(client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, stream=True,
                                            logprobs=2, echo=True, extra_body={"ignore_eos": True}))
    gen = plain(local, ids, 12, logprobs=2, prompt_logprobs=2, stop_at_eos=False)
    assert "".join(c.choices[0].text for c in chunks) == decode(ids) + decode(gen.tokens)
    lps = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert lps == [None] + [e.logprob for e in gen.prompt_logprobs[1:]] + [e.logprob for e in gen.logprobs]
    offsets = [v for c in chunks for v in c.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[len(ids)] == len(decode(ids))


def test_n_choices_are_prompt_major_and_a_seed_reproduces_them(client, local):
    kw = dict(model=NAME, prompt=[PROMPTS[1], PROMPTS[9]], max_tokens=10, temperature=0.9, n=3, seed=21,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices[:3]}) > 1  # each choice draws its own sample
    # choice 0 of each prompt is the request's seed itself: a plain seeded request
    assert a.choices[0].text == solo(local, encode(PROMPTS[1]), 10, temperature=0.9, seed=21, ignore_eos=True)[0]
    assert a.choices[3].text == solo(local, encode(PROMPTS[9]), 10, temperature=0.9, seed=21, ignore_eos=True)[0]
    assert a.usage.completion_tokens == 60
    assert a.usage.prompt_tokens == len(encode(PROMPTS[1])) + len(encode(PROMPTS[9]))


def test_logit_bias_and_penalties_through_the_server_equal_the_reference_loop(client, ckpts):
    from conftest import hf_model, reference_greedy

    hf = hf_model(ckpts[0])
    ids = encode(PROMPTS[6])
    for bias, presence, frequency in (({"13": 5.0, "198": -100}, 0.0, 0.0), ({}, 1.2, 0.8), ({"262": 3}, -0.5, 2.0)):
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, logit_bias=bias,
                                      presence_penalty=presence, frequency_penalty=frequency,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        want = reference_greedy(hf, ids, 12, {int(t): v for t, v in bias.items()}, presence, frequency)
        assert r.choices[0].model_extra["token_ids"] == want


def test_any_number_of_stop_strings(client, local):
    ids = encode(PROMPTS[4])
    text, _, _ = solo(local, ids, 30, temperature=0, ignore_eos=True)
    stops = ["\x00never", "zzzq", "##", "qqq", "never-seen", text[7:9]]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=30, temperature=0, stop=stops,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[: text.find(text[7:9])] and r.choices[0].finish_reason == "stop"


def test_neutral_values_mean_not_set(client, local):
    """What langchain-openai always sends."""
    r = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=6, temperature=0, n=1, best_of=1,
                                  presence_penalty=0, frequency_penalty=0, logit_bias={}, logprobs=None,
                                  extra_body={"some_unknown_field": 3})
    assert r.choices[0].text == solo(local, encode(PROMPTS[3]), 6, temperature=0)[0]
    assert r.choices[0].logprobs is None


def test_tokenizer_routes(server):
    text = "Hello world<|endoftext|> naïve café"
    t = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert t == {"count": len(encode(text)), "max_model_len": CONTEXT, "tokens": encode(text)}
    assert EOT_ID in t["tokens"]
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["eos_token_id"], info["model_max_length"]) == ("<|endoftext|>", EOT_ID, CONTEXT)
    assert info["tokenizer_class"]
    for body in ({"tokens": [50257]}, {"tokens": [-1]}, {"tokens": ["a"]}, {"tokens": [1.5]}):
        r = httpx.post(server.url + "/detokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", body
    r = httpx.post(server.url + "/tokenize", json={"prompt": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "gpt-4"}).status_code == 404


def test_a_prompt_past_the_context_says_what_the_context_is_and_what_to_shorten(server):
    def message(body):
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400
        return r.json()["error"]["message"]

    m = message({"prompt": [1] * (CONTEXT + 5), "max_tokens": 1})
    assert f"context is {CONTEXT} tokens" in m and f"shorten the prompt to at most {CONTEXT - 1} tokens" in m
    m = message({"prompt": [1] * (CONTEXT - 3)})  # max_tokens left out: its default is named as such
    assert "max_tokens defaults to 16" in m and "at most 3" in m
    m = message({"prompt": [1] * (CONTEXT - 3), "max_tokens": 9})
    assert "max_tokens is 9" in m and "at most 3" in m


def test_a_seeded_sample_through_the_server_with_a_draft_equals_plain_decoding(client, local):
    """The server drafts (K=3, a model); sybil.generate here does not: same tokens."""
    for seed in range(3):
        for temperature in (0.7, 1.0):
            ids = encode(PROMPTS[seed])
            r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=temperature, top_p=0.9,
                                          seed=seed, extra_body={"top_k": 50, "ignore_eos": True,
                                                                 "return_token_ids": True})
            want = plain(local, ids, 12, temperature=temperature, top_p=0.9, top_k=50, seed=seed, stop_at_eos=False)
            assert r.choices[0].model_extra["token_ids"] == want.tokens, (seed, temperature)


def test_a_repeated_prompt_reuses_its_slot_entries_and_answers_the_same(server, client, local):
    """The prompt cache: the second request for a long prompt takes its entries from the
    slot the first one left, counted in /metrics; both answers are the solo answer."""
    prompt = " ".join(PROMPTS) * 2
    want = solo(local, encode(prompt), 12, temperature=0)[0]
    before = _metric(server, "sybil_cached_prompt_tokens")
    answers = [client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0) for _ in range(2)]
    assert [a.choices[0].text for a in answers] == [want, want]
    assert _metric(server, "sybil_cached_prompt_tokens") - before >= len(encode(prompt)) - 1
    # usage reports it as vLLM and OpenAI do: all but the prompt's last token came from the slot
    assert answers[1].usage.prompt_tokens_details.cached_tokens == len(encode(prompt)) - 1
