"""Downloads: verification, and failing offline with one line that says where to put files."""

import hashlib
import subprocess
import sys

import pytest

from sybil.errors import SybilError
from sybil.weights.download import download_preset, file_digest, verify_file


def test_file_digests(tmp_path):
    f = tmp_path / "config.json"
    f.write_bytes(b"hello\n")
    assert file_digest(f) == hashlib.sha256(b"hello\n").hexdigest()
    # git's blob id of "hello\n", as `git hash-object` prints it
    assert file_digest(f, git_blob=True) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_a_file_failing_its_hash_is_deleted(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"truncated")
    verify_file(f, hashlib.sha256(b"truncated").hexdigest(), None)  # matches: kept
    assert f.exists()
    with pytest.raises(SybilError, match="hash check"):
        verify_file(f, "0" * 64, None)
    assert not f.exists()


def test_offline_download_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SybilError, match="put config.json and model.safetensors in"):
        download_preset("gpt2", tmp_path)
    assert not any((tmp_path / "gpt2").glob("*.safetensors"))


def test_cli_offline_exit_status_2_and_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "sybil.download", "gpt2", "--dir", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: could not download gpt2")


def test_unknown_preset():
    with pytest.raises(SybilError, match="unknown preset"):
        download_preset("gpt5", None)
