"""Stage a local model dir into the Hugging Face hub cache layout, so it loads by its Hub id offline.

Layout written (what huggingface_hub's cache lookup reads):
    {cache_dir}/models--{org}--{name}/refs/main            -> "<40-hex commit hash>"
    {cache_dir}/models--{org}--{name}/snapshots/<hash>/... -> the model files
Real caches keep content in blobs/ and symlink snapshot files to them; plain files in the snapshot
work just as well for loading. With HF_HUB_OFFLINE=1 (read once, at huggingface_hub import; set
`huggingface_hub.constants.HF_HUB_OFFLINE = True` at run time) `from_pretrained(repo_id,
cache_dir=cache_dir)` then resolves locally in ~0.1 s with no network probe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def repo_folder_name(repo_id: str) -> str:
    """'org/name' -> 'models--org--name' (same as huggingface_hub's repo_folder_name)."""
    return "models--" + "--".join(repo_id.split("/"))


def stage_in_hf_cache(
    model_dir: str | Path, repo_id: str, cache_dir: str | Path, revision_hash: str | None = None
) -> Path:
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir {model_dir} does not exist")
    if revision_hash is None:
        # Deterministic fake commit hash: same repo id -> same snapshot dir.
        revision_hash = hashlib.sha1(repo_id.encode("utf-8")).hexdigest()
    if len(revision_hash) != 40 or any(c not in "0123456789abcdef" for c in revision_hash):
        raise ValueError(f"revision_hash must be 40 lowercase hex digits, got {revision_hash!r}")

    repo_dir = cache_dir / repo_folder_name(repo_id)
    snapshot = repo_dir / "snapshots" / revision_hash
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    # Copy into a temp dir and rename, so a concurrent reader never sees a half-copied snapshot.
    tmp = Path(tempfile.mkdtemp(prefix=f".{revision_hash}.tmp-", dir=snapshot.parent))
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        os.replace(tmp, snapshot)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision_hash)  # no trailing newline, like the hub
    return snapshot
