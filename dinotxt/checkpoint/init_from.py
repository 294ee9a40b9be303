"""``model.init_from``: start training from released or earlier weights instead of a random init.

It takes, detected from the files:

- a dinotxt checkpoint (a folder, or one ``.safetensors`` file): every trainable weight, and its
  tokenizer;
- the official DINOv2 dino.txt release: its two head files (vision head + text encoder), a list
  of two paths in either order;
- the official DINOv3 dino.txt file (vision head and text encoder in one file, maybe the logit scale);
- a text tower alone: the official text encoder file (the vision head starts from its init).

Every file is loaded strictly through the key maps of ``dinotxt.checkpoint.official`` (or the
checkpoint's own keys): a file that does not fit the configured model stops the run with the key
report the loaders print. The weights bring their tokenizer: the official ones OpenAI's CLIP BPE,
a checkpoint its own file, which the run then trains with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import ListConfig

from ..config import ConfigError
from ..models.weights import StateDict, load_state_dict_file

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    """What ``model.init_from`` named, read before the model exists (the tokenizer comes first)."""

    kind: str  # checkpoint | official
    paths: List[str]
    tokenizer_kind: str  # sentencepiece | clip_bpe
    tokenizer_bytes: Optional[bytes] = None  # the checkpoint's tokenizer file (None: open_clip's CLIP BPE)
    state: StateDict = field(default_factory=dict)  # checkpoint: our keys
    official: Dict[str, StateDict] = field(default_factory=dict)  # official: role -> file state
    release: Any = None

    def describe(self) -> str:
        return f"{self.kind} {', '.join(self.paths)}"


def read_init_source(spec) -> Optional[InitSource]:
    """The weights ``model.init_from`` names (a path, or a list of the two DINOv2-release files)."""
    if spec is None:
        return None
    paths = [str(p) for p in (list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec])]
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"model.init_from: {p} does not exist")
    first = Path(paths[0])
    if len(paths) == 1 and (first.is_dir() or first.suffix == ".safetensors"):
        from .record import read_record

        record = read_record(first, with_backbone=False)
        kind = "clip_bpe" if record.tokenizer_kind == "clip_bpe" else "sentencepiece"
        return InitSource("checkpoint", paths, kind, record.tokenizer_bytes, state=dict(record.state))
    from .official import RELEASES, guess_official_role

    files = {}
    for p in paths:
        state = load_state_dict_file(p)
        role = guess_official_role(state)
        if role is None:
            raise ConfigError(f"model.init_from: {p} is neither a dinotxt checkpoint nor an official dino.txt head file "
                              "(vision head, text encoder, or the DINOv3 file)")
        if role in files:
            raise ConfigError(f"model.init_from: two {role.replace('_', ' ')} files ({paths})")
        files[role] = state
    layout = "dinov3" if "weights" in files else "dinov2"
    if layout == "dinov3" and len(files) > 1:
        raise ConfigError("model.init_from: the DINOv3 release is ONE file holding both heads; give it alone")
    release = next(r for r in RELEASES.values() if r.layout == layout)
    return InitSource("official", paths, "clip_bpe", official=files, release=release)


def apply_init(model, source: Optional[InitSource]) -> None:
    """Load ``source`` into ``model``'s trainable weights, strictly (the parts it holds); a variant's own
    weights that the source lacks (a logit bias, unlocked backbone blocks) keep their init."""
    if source is None:
        return
    if source.kind == "checkpoint":
        model.load_trainable_state_dict(source.state, keep_variants=True)
    else:
        from .official import KEY_MAPS, official_trainable_state

        roles = list(source.official)
        complete = set(roles) == set(KEY_MAPS[source.release.layout])
        state = official_trainable_state(model, source.release, source.official, dict(zip(roles, source.paths)),
                                         roles=None if complete else roles)
        if complete:
            model.load_trainable_state_dict(state, keep_variants=True)
        else:  # a text encoder alone: its part, checked above; the rest keeps its init
            own = model.trainable_state_dict()
            with torch.no_grad():
                for key, value in state.items():
                    own[key].copy_(value.reshape(own[key].shape).to(own[key].dtype))
    log.info(f"initialised from {source.describe()}")
