"""Fetching preset checkpoints from the Hugging Face Hub into weights/<name>/.

Only model.safetensors and config.json are fetched. huggingface-hub shows the
progress bar, resumes an interrupted download from its .incomplete file and moves
the file into place only once complete; we then check each file's hash against
the one the Hub lists, and delete a file that does not match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sybil.errors import SybilError

REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
FILES = ("config.json", "model.safetensors")


def file_digest(path: Path, git_blob: bool = False) -> str:
    """sha256 of the file, or its git blob sha1 (how the Hub names non-LFS files)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if git_blob else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, expected_sha256: str | None, expected_blob: str | None) -> None:
    """Raise (after deleting the file) if it does not match the Hub's hash."""
    ok = file_digest(path) == expected_sha256 if expected_sha256 else file_digest(path, git_blob=True) == expected_blob
    if not ok:
        path.unlink(missing_ok=True)
        raise SybilError(f"{path} failed its hash check and was deleted; run the download again")


def download_preset(name: str, weights_dir: Path) -> Path:
    """Download one preset's files into weights_dir/name and return that folder."""
    if name not in REPOS:
        raise SybilError(f"unknown preset {name!r}; choose from {', '.join(REPOS)}")
    from huggingface_hub import (  # its import is slow; only a download pays it
        HfApi,
        hf_hub_download,
    )

    target = weights_dir / name
    repo = REPOS[name]
    try:
        infos = {i.path: i for i in HfApi().get_paths_info(repo, list(FILES), expand=True)}
        for fname in FILES:
            local = Path(hf_hub_download(repo, fname, local_dir=target))
            info = infos[fname]
            lfs = getattr(info, "lfs", None)
            verify_file(local, lfs.sha256 if lfs else None, info.blob_id)
    except SybilError:
        raise
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SybilError(
            f"could not download {name} from {repo} ({reason}); "
            f"offline, put {' and '.join(FILES)} in {target}/"
        ) from None
    return target


def default_weights_dir() -> Path:
    """weights/ of the source checkout when running from one, else ./weights."""
    root = Path(__file__).resolve().parents[2]
    return root / "weights" if (root / "setup.cfg").is_file() else Path.cwd() / "weights"
