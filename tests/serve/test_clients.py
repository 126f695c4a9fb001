"""Real clients against a real server on 127.0.0.1: lm-evaluation-harness scoring and
generating through Sybil (its remote tokenizer included) gives what its own `hf`
backend gives on the same random-weight checkpoint; langchain-openai and litellm get
the answers a solo sybil.generate call gives."""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks are local JSONL files: never the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price table at import

from conftest import Server

import sybil
from sybil.weights.tokenizer import decode, encode

torch.set_grad_enabled(False)
NAME = "small"


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint, tmp_path_factory):
    """The 'small' checkpoint with GPT-2 tokenizer files beside it, for lm-eval's hf backend."""
    from bench.peers import write_hf_tokenizer

    out = tmp_path_factory.mktemp("small-tok")
    for f in hf_checkpoint("small").iterdir():
        shutil.copy(f, out / f.name)
    write_hf_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    srv = Server(tmp_path_factory.mktemp("srv"), "--model", str(checkpoint), "--draft", "ngram", "--k", "3",
                 "--dtype", "float32", "--max-batch", "4", "--served-model-name", NAME)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def local(checkpoint):
    return sybil.load_model(checkpoint, torch.float32)


def solo_text(model, prompt: str, n: int) -> str:
    out = sybil.generate(model, encode(prompt), n)
    return decode([t for t in out.tokens if t != 50256])


PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning"]


# ---- lm-evaluation-harness

DOCS = [
    {"q": "The capital of France is", "a": " Paris", "choices": [" Paris", " London", " a city", " blue"], "gold": 0},
    {"q": "Two plus two equals", "a": " four", "choices": [" four", " five"], "gold": 0},
    {"q": "The sky on a clear day is", "a": " blue", "choices": [" green", " blue", " loud"], "gold": 1},
    {"q": "Water freezes at zero degrees", "a": " Celsius", "choices": [" Celsius", " Kelvin"], "gold": 0},
    {"q": "A young cat is called a", "a": " kitten", "choices": [" puppy", " kitten", " calf"], "gold": 1},
    {"q": "", "a": "Hello", "choices": ["Hello", "World"], "gold": 1},  # an empty context: the prefix token
]

TASKS = {
    "sybil_ll": """
task: sybil_ll
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: loglikelihood
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "sybil_mc": """
task: sybil_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "sybil_gen": """
task: sybil_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n", "Q:", "."]
  max_gen_toks: 12
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(data=data))
    return d


def run_lm_eval(model: str, model_args: str, task_dir):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm-eval[api]) is a test dependency")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), device="cpu",
                                   batch_size=1 if model == "hf" else 4, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(task_dir)))


def test_lm_eval_through_sybil_equals_its_hf_backend(server, checkpoint, task_dir):
    api = run_lm_eval("local-completions",
                      f"base_url={server.url}/v1/completions,model={NAME},tokenizer_backend=remote,"
                      "max_length=256,tokenized_requests=True,num_concurrent=2", task_dir)
    hf = run_lm_eval("hf", f"pretrained={checkpoint},dtype=float32", task_dir)
    for task in TASKS:
        a = sorted(api["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == len(DOCS)
        for sa, sb in zip(a, b):
            if task == "sybil_gen":
                assert sa["filtered_resps"] == sb["filtered_resps"], sa["doc_id"]
                continue
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(sa["filtered_resps"], sb["filtered_resps"]):
                assert abs(float(ll_a) - float(ll_b)) < 1e-3, (task, sa["doc_id"])
                assert bool(greedy_a) == bool(greedy_b)
        for metric, value in hf["results"][task].items():
            if metric.endswith(",none") and isinstance(value, float):
                assert api["results"][task][metric] == pytest.approx(value, rel=1e-3, abs=1e-6), (task, metric)


# ---- langchain-openai and litellm

def test_langchain_openai_invoke_batch_and_stream(server, local):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is a test dependency")
    llm = lc.OpenAI(base_url=server.url + "/v1", api_key="unused", model=NAME, temperature=0, max_tokens=10,
                    max_retries=0)
    want = [solo_text(local, p, 10) for p in PROMPTS]
    assert llm.invoke(PROMPTS[0]) == want[0]
    assert llm.batch(PROMPTS) == want
    pieces = list(llm.stream(PROMPTS[1]))
    assert "".join(pieces) == want[1] and len(pieces) > 1


def test_litellm_text_completion(server, local):
    litellm = pytest.importorskip("litellm", reason="litellm is a test dependency")
    r = litellm.text_completion(model=f"text-completion-openai/{NAME}", api_base=server.url + "/v1",
                                api_key="unused", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    assert r.choices[0].text == solo_text(local, PROMPTS[2], 10)
    assert r.usage.completion_tokens == len(sybil.generate(local, encode(PROMPTS[2]), 10).tokens)
