"""Resolve a checkpoint given as a local folder or a Hugging Face hub repo id."""

from __future__ import annotations

import os
from pathlib import Path

# Everything a checkpoint folder may need; pickled weights are never fetched.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


class CheckpointNotFoundError(OSError):
    """The folder does not exist and the hub repo could not be fetched or found in the cache."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint: the folder itself, or a hub snapshot in the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists():
        raise CheckpointNotFoundError(f"{name!r} is a file, not a checkpoint folder")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointNotFoundError(
            f"{name!r} is neither an existing folder nor a hub repo id (owner/name)"
        )

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as online_error:  # network down, repo missing, gated...
        try:
            return Path(
                snapshot_download(
                    name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True
                )
            )
        except Exception:
            raise CheckpointNotFoundError(
                f"could not load {name!r}: it is not a local folder, the hub could not be reached or "
                f"refused it ({type(online_error).__name__}: {online_error}), and it is not in the local "
                "Hugging Face cache"
            ) from online_error
