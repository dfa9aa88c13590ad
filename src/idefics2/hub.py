"""Resolve a checkpoint given as a local folder or a Hugging Face hub repo id, and read its JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Everything a checkpoint folder may need; pickled weights are never fetched.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


class CheckpointError(ValueError):
    """A checkpoint is unusable: corrupted or pickled files, bad settings, or tensors that do not fit the
    model."""


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A checkpoint, or a file it needs, cannot be found: the folder does not exist and the hub repo could not
    be fetched or found in the cache, or the folder lacks the file. Both a FileNotFoundError and a
    ValueError, so it is caught as either."""


def read_json(path: Path, *, what: str = "JSON file", required: bool = False) -> dict[str, Any]:
    """A checkpoint's JSON file holding an object; {} when it is absent and not `required`. Anything else
    (not UTF-8, not JSON, not an object) raises CheckpointError naming the file and `what` it should be."""
    if not path.is_file():
        if required:
            raise CheckpointNotFoundError(f"no {path.name} in {path.parent}")
        return {}

    def invalid(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid {what}: {why}")

    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise invalid(f"not UTF-8 text (byte {error.start}); is the file corrupted?") from None
    except json.JSONDecodeError as error:
        raise invalid(f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise invalid("JSON nested too deeply to read") from None
    except ValueError:  # json reads integers of at most 4300 digits
        raise invalid("a number with too many digits") from None
    if not isinstance(data, dict):
        raise invalid(f"it must hold a JSON object, not {type(data).__name__}")
    return data


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint: the folder itself, or a hub snapshot in the HF cache."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(
            f"a checkpoint is a folder or a hub repo id (str), got {type(path_or_repo_id).__name__}"
        )
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
