"""The mixed serving workload of `bench.serve --workload mixed` and `--duration` (a soak).

What a public server sees rather than a benchmark's identical requests: prompt lengths
from 2 to 400 tokens, outputs of 8 to 128, a share of prompts that open with one of a
few long shared prefixes (system prompts, an evaluation's context) and a share that
repeat an earlier request exactly, streams and non-streams, clients that disconnect
mid-stream, and bad requests that must get a 4xx, never a 5xx. Every request is greedy
with <|endoftext|> ignored, so each completed answer has one right value: what the
server gives the same request alone (`check_solo`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import httpx

from sybil.errors import SybilError

VOCAB = 50257
PREFIXES, PREFIX_LEN = 4, (150, 300)
SHARE_PREFIX, SHARE_REPEAT, SHARE_DISCONNECT, SHARE_BAD = 0.3, 0.1, 0.05, 0.05
def bad_changes(context: int) -> list[dict]:
    """Changes to a request's body that make it bad: each must be answered 400."""
    return [
        {"prompt": [1, 2, VOCAB + 7]},  # a token outside the vocabulary
        {"prompt": [11] * (context + 76)},  # a prompt past the context
        {"max_tokens": -3},
        {"temperature": -1.0},
    ]


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    stream: bool
    kind: str = "ok"  # "ok", "disconnect" (the client leaves after a few tokens) or "bad"
    bad: dict = field(default_factory=dict)

    def body(self) -> dict:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": self.stream, "return_token_ids": True}
        return {**body, **self.bad}


def requests(seed: int, context: int = 1024):
    """An endless, seeded stream of mixed requests for a model of this context (prompts
    of up to 400 tokens, or less where prompt and output would not fit)."""
    rng = random.Random(seed)
    longest = min(400, context - 129)
    bad = bad_changes(context)
    words = lambda n: [rng.randrange(VOCAB - 1) for _ in range(n)]  # noqa: E731
    prefixes = [words(min(rng.randint(*PREFIX_LEN), longest - 1)) for _ in range(PREFIXES)]
    done: list[Request] = []
    while True:
        r = rng.random()
        if r < SHARE_BAD:
            yield Request(words(8), 16, rng.random() < 0.5, "bad", bad[rng.randrange(len(bad))])
            continue
        if r < SHARE_BAD + SHARE_REPEAT and done:
            old = done[rng.randrange(len(done))]
            yield Request(old.prompt, old.max_tokens, rng.random() < 0.5)
            continue
        n = rng.randint(2, longest)
        if rng.random() < SHARE_PREFIX:
            prefix = prefixes[rng.randrange(PREFIXES)]
            prompt = prefix[: n - 1] + words(max(1, n - len(prefix)))
        else:
            prompt = words(n)
        kind = "disconnect" if rng.random() < SHARE_DISCONNECT / (1 - SHARE_BAD) else "ok"
        req = Request(prompt, rng.randint(8, 128), kind == "disconnect" or rng.random() < 0.5, kind)
        if kind == "ok":
            done.append(req)
        yield req


def send(client: httpx.Client, url: str, req: Request) -> dict:
    """One request: its status, token ids, time to first token and per-token gaps."""
    t0 = time.perf_counter()
    out = {"kind": req.kind, "status": None, "ids": [], "ttft_s": None, "gaps_s": [], "req": req}
    if not req.stream:
        r = client.post(url + "/v1/completions", json=req.body(), timeout=600)
        out["status"] = r.status_code
        if r.status_code == 200:
            out["ids"] = r.json()["choices"][0].get("token_ids") or []
        return out
    last = None
    with client.stream("POST", url + "/v1/completions", json=req.body(), timeout=600) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            r.read()
            return out
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["status"] = 500
                return out
            ids = chunk["choices"][0].get("token_ids")
            n = len(ids) if ids is not None else int(bool(chunk["choices"][0].get("text")))
            if not n:
                continue
            now = time.perf_counter()
            if out["ttft_s"] is None:
                out["ttft_s"] = now - t0
            else:
                out["gaps_s"] += [(now - last) / n] * n
            last = now
            out["ids"] += ids or [None] * n
            if req.kind == "disconnect" and len(out["ids"]) >= 3:
                break  # leaving the with-block closes the connection mid-stream
    return out


def problems(results: list[dict]) -> list[str]:
    """What the server got wrong: a 5xx, a bad request not answered 4xx, a good one not
    answered 200 or cut short."""
    found = []
    for r in results:
        req = r["req"]
        if r["status"] is not None and r["status"] >= 500:
            found.append(f"{r['status']} for a {req.kind} request")
        elif req.kind == "bad" and r["status"] != 400:
            found.append(f"a bad request ({req.bad}) answered {r['status']}")
        elif req.kind == "ok" and (r["status"] != 200 or len(r["ids"]) != req.max_tokens):
            found.append(f"a good request answered {r['status']} with {len(r['ids'])}/{req.max_tokens} tokens")
    return found


def check_solo(url: str, results: list[dict], most: int) -> tuple[int, list[str]]:
    """Send up to `most` of the completed greedy requests again, alone: a row's output
    must not depend on the rows that shared its rounds. (checked, mismatches)"""
    done = [r for r in results if r["req"].kind == "ok" and r["status"] == 200 and None not in r["ids"]]
    seen, picked = set(), []
    for r in done:
        key = (tuple(r["req"].prompt), r["req"].max_tokens)
        if key not in seen:
            seen.add(key)
            picked.append(r)
    picked = picked[:most]
    bad = []
    with httpx.Client(timeout=600) as c:
        for r in picked:
            alone = send(c, url, Request(r["req"].prompt, r["req"].max_tokens, False))
            if alone["ids"] != r["ids"]:
                bad.append(f"a {len(r['req'].prompt)}-token prompt: under load {r['ids'][:8]}..., alone "
                           f"{alone['ids'][:8]}...")
    return len(picked), bad


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise SybilError(f"cannot read the resident memory of process {pid}")


def cache_workload(url: str, seed: int, context: int) -> dict:
    """What the prompt cache and a lookup draft are for, on one server: a 400-token prompt
    sent twice (time to first token of each); 20 lm-evaluation-harness loglikelihood
    requests (one context, an answer each, echo with logprobs, max_tokens 0) from 4
    clients (total time); and one greedy request sent twice (decode tokens/s of each,
    where a suffix draft can reuse the first answer)."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(VOCAB - 1) for _ in range(n)]  # noqa: E731
    long = words(min(400, context - 20))
    out = {}
    with httpx.Client(timeout=600) as c:
        first, again = (send(c, url, Request(long, 4, True)) for _ in range(2))
        out["repeat_ttft_ms"] = [1000 * first["ttft_s"], 1000 * again["ttft_s"]]
        shared = words(min(300, context - 40))
        scoring = [{"prompt": shared + words(rng.randint(2, 8)), "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0} for _ in range(20)]
        answers: list = [None] * len(scoring)

        def score(i: int) -> None:
            with httpx.Client(timeout=600) as cc:
                for j in range(i, len(scoring), 4):
                    answers[j] = cc.post(url + "/v1/completions", json=scoring[j]).json()

        t0 = time.perf_counter()
        threads = [__import__("threading").Thread(target=score, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["lmeval_20_s"] = time.perf_counter() - t0
        out["lmeval_logprobs"] = [a["choices"][0]["logprobs"]["token_logprobs"] for a in answers]
        prompt = words(40)
        speeds = []
        for _ in range(2):
            r = send(c, url, Request(prompt, 96, True))
            decode_s = sum(r["gaps_s"])
            speeds.append((len(r["ids"]) - 1) / decode_s if decode_s else None)
            out.setdefault("repeat_ids", []).append(r["ids"])
        out["repeat_decode_tokens_per_s"] = speeds
    return out
