"""The Python blocks of the README and of docs/ run as written: each is extracted and run
in a fresh process against small random-weight checkpoints (preset names in load_model
calls point at them: no download), the server examples against a real server."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, Server

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCKS = [(f"{page.relative_to(REPO)}:{n}", code) for page in PAGES
          for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def test_the_readme_and_the_docs_have_python_blocks():
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 2
    assert sum(name.startswith("docs/") for name, _ in BLOCKS) >= 2


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoint, noisy_checkpoint):
    return {"gpt2-medium": hf_checkpoint("small"), "gpt2": noisy_checkpoint}


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    srv = Server(tmp_path_factory.mktemp("readme"), "--model", str(checkpoints["gpt2-medium"]), "--dtype",
                 "float32", "--served-model-name", "gpt2-medium")
    yield srv
    srv.stop()


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[name for name, _ in BLOCKS])
def test_each_python_block_runs_as_written(i, checkpoints, request):
    name, code = BLOCKS[i]
    for name, path in checkpoints.items():
        code = code.replace(f'load_model("{name}"', f'load_model(r"{path}"')
    if "http://127.0.0.1:8000" in code:
        code = code.replace("http://127.0.0.1:8000", request.getfixturevalue("server").url)
    assert 'load_model("' not in code, "a preset that would need a download"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{code}\n{r.stderr[-2000:]}"
