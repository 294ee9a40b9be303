"""Checkpoints on the Hugging Face Hub: ``hf-hub:org/name[@revision]``, as open_clip names them.

A Hub repository made by ``dinotxt push-to-hub`` is a checkpoint folder (``model.safetensors``,
``config.yaml``, the tokenizer file, optionally ``backbone.safetensors``) plus its model card
``README.md``. ``hub_snapshot`` brings it into the local folder where ``huggingface_hub`` keeps
it (``snapshot_download``), so everything that library promises holds: its cache
(``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``), revisions (a branch, a tag or a commit
after ``@``), offline mode (``HF_HUB_OFFLINE=1``: the cached snapshot, no network), tokens for
private repositories (``hf auth login`` / ``HF_TOKEN``). ``dinotxt.load``, ``read_checkpoint``,
``create_model_and_transforms`` and every ``--checkpoint`` option take such a name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from ..utils.log import error_line

HUB_PREFIX = "hf-hub:"
LIBRARY_NAME = "dinotxt"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_hub_name(name: Union[str, Path, None]) -> bool:
    """Whether ``name`` is an ``hf-hub:org/name[@revision]`` reference (a Path never is)."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """``("org/name", revision or None)`` of ``hf-hub:org/name[@revision]``."""
    if not is_hub_name(name):
        raise ValueError(f"{name!r} is not a Hub name: write hf-hub:org/name (optionally @revision)")
    repo_id, _, revision = name[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{name!r}: the Hub repository must be written org/name (got {repo_id!r})")
    if "@" in name[len(HUB_PREFIX):] and not revision:
        raise ValueError(f"{name!r}: nothing after '@'; give a branch, tag or commit, or drop the '@'")
    return repo_id, revision or None


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the Hub spells repository ids (an ``hf-hub:`` prefix is accepted and dropped)."""
    repo_id = repo_id[len(HUB_PREFIX):] if repo_id.startswith(HUB_PREFIX) else repo_id
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"Hub repository {repo_id!r} must be written org/name")
    return repo_id


def hub_snapshot(name: str, cache_dir: Optional[Union[str, Path]] = None, skip: Sequence[str] = ()) -> Path:
    """The local folder of ``hf-hub:org/name[@revision]`` (downloaded into the Hugging Face cache
    unless it is there; with ``HF_HUB_OFFLINE=1`` only the cache is read).

    Args:
        name: ``hf-hub:org/name`` or ``hf-hub:org/name@revision``.
        cache_dir: the Hub cache folder (default: ``huggingface_hub``'s, from ``HF_HOME`` / ``HF_HUB_CACHE``).
        skip: file names not to download (the backbone file when the caller brings its own).
    """
    repo_id, revision = parse_hub_name(name)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise ImportError(f"loading {name} needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                                   ignore_patterns=list(skip) or None, library_name=LIBRARY_NAME)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{name}: the repository {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name}: no model repository {repo_id} on the Hub (a private one needs a token: "
                                "`hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        first = error_line(e)
        raise FileNotFoundError(f"{name} is not in the local Hugging Face cache and the Hub cannot be reached "
                                f"(HF_HUB_OFFLINE=1, or no network): {first}") from None
    return Path(folder)


__all__ = ["HUB_PREFIX", "is_hub_name", "parse_hub_name", "check_repo_id", "hub_snapshot"]
