"""``dinotxt export``: a trained checkpoint in the official dino.txt layout, or as one file.

``--format official`` writes the trainable heads with the key names of the official
dino.txt release (``dinotxt.checkpoint.official``; DINOv2 release: a ``*_vision_head.pth``
and a ``*_text_encoder.pth``; DINOv3 release: one ``*_vision_head_and_text_encoder.pth``),
so the official code (``dinov2/hub/dinotxt.py``, ``dinov3/hub/dinotxt.py``) loads them
with ``load_state_dict(..., strict=True)``. It also writes ``export.json`` saying which
architecture the files have and whether the official entry point can build it: that
code builds only the released ViT-L / 1280-wide text architecture and tokenizes with the
CLIP BPE, so other sizes or a SentencePiece-trained text tower need the official modules
built with the sizes listed there (the tokenizer file is copied next to the weights).

``--format safetensors`` writes one self-describing file (weights, config, tokenizer;
with ``--include-backbone`` also the frozen backbone) that ``dinotxt.load`` reads.

Only the checkpoint's own files are read; the frozen backbone is built only for
``--include-backbone``. CHECKPOINT may be ``hf-hub:org/name`` (outputs default to ``./name...``).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..models.dinotxt import UNLOCKED_PREFIX
from ..utils.fileio import atomic_write_bytes, atomic_write_json
from .format import save_single_file
from .official import RELEASES, official_state_dicts
from .record import BACKBONE_PREFIX, backbone_state, read_record

FORMATS = ("official", "safetensors")


def _architecture(model_cfg, state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The sizes the official modules must be built with to take these files."""
    blocks = {k.split(".")[2] for k in state if k.startswith("vision_head.block_list.")}
    text_blocks = {k.split(".")[3] for k in state if k.startswith("text.backbone.blocks.")}
    emb = state["text.backbone.token_embedding.weight"]
    return {
        "backbone": str(model_cfg.backbone.name),
        "backbone_weights": model_cfg.backbone.weights,
        "vision_head_blocks": len(blocks),
        "vision_head_heads": model_cfg.vision_head.num_heads,
        "text_vocab_size": int(emb.shape[0]),
        "text_context_length": int(state["text.backbone.positional_embedding"].shape[0]),
        "text_width": int(emb.shape[1]),
        "text_depth": len(text_blocks),
        "text_heads": int(model_cfg.text.heads),
        "embed_dim": int(state["text.head.linear_projection.weight"].shape[0]),
    }


def _local_name(checkpoint: Union[str, Path]) -> Path:
    """The path default outputs are named after: the checkpoint's, or ``./<name>`` for ``hf-hub:org/name``."""
    from .hub import is_hub_name, parse_hub_name

    return Path(parse_hub_name(checkpoint)[0].split("/")[-1]) if is_hub_name(checkpoint) else Path(checkpoint)


def export_official(checkpoint: Union[str, Path], out: Optional[Union[str, Path]] = None,
                    layout: Optional[str] = None) -> Dict[str, object]:
    """Write a checkpoint's heads in the official dino.txt layout. Returns the ``export.json`` report.

    Args:
        checkpoint: checkpoint folder (or single file).
        out: output folder (default: ``<checkpoint>_official`` next to it).
        layout: ``dinov2`` (two files) or ``dinov3`` (one file); default from the backbone name.
    """
    record = read_record(checkpoint, with_backbone=False)
    cfg, state, tok_bytes = record.config, record.state, record.tokenizer_bytes
    checkpoint = _local_name(checkpoint)
    mcfg = cfg.model
    layout = layout or ("dinov3" if "dinov3" in str(mcfg.backbone.name) else "dinov2")
    state = dict(state)
    # what the official release has no place for: unlocked backbone blocks get a file of their own, the
    # sigmoid loss's bias is recorded in export.json
    unlocked = {k[len(UNLOCKED_PREFIX + "encoder."):]: state.pop(k) for k in [k for k in state if k.startswith(UNLOCKED_PREFIX)]}
    bias = state.pop("logit_bias", None)
    files = official_state_dicts(state, layout)
    out = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + "_official")
    release = next(r for r in RELEASES.values() if r.layout == layout)
    arch = _architecture(mcfg, state)
    prefix = str(mcfg.arch or "dinotxt")
    suffixes = {"vision_head": "_vision_head.pth", "text_encoder": "_text_encoder.pth",
                "weights": "_vision_head_and_text_encoder.pth"}
    written = []
    for role, tensors in files.items():
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
        path = out / (prefix + suffixes[role])
        atomic_write_bytes(path, buf.getvalue())
        written.append(path.name)
    if unlocked:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in unlocked.items()}, buf)
        path = out / (prefix + "_backbone_unlocked.pth")
        atomic_write_bytes(path, buf.getvalue())
        written.append(path.name)
    tok_name = str(cfg.tokenizer.file)
    atomic_write_bytes(out / tok_name, tok_bytes)
    from ..config import model_config

    release_cfg = model_config(release.arch)
    same_arch = (str(mcfg.backbone.name).removesuffix("_qkvb") == release_cfg.backbone.name
                 and arch["vision_head_blocks"] == release_cfg.vision_head.num_blocks
                 and arch["text_width"] == release_cfg.text.width and arch["text_depth"] == release_cfg.text.depth
                 and arch["text_heads"] == release_cfg.text.heads and arch["text_vocab_size"] == release_cfg.text.vocab_size
                 and mcfg.vision_head.use_patch_tokens and mcfg.vision_head.pooling == "mean"
                 and float(mcfg.vision_head.mlp_ratio) == 4.0 and float(mcfg.text.mlp_ratio) == 4.0)
    report = {
        "layout": layout,
        "official_release_layout": release.name,
        "files": written,
        "tokenizer": {"kind": str(cfg.tokenizer.kind), "file": tok_name},
        "architecture": arch,
        "logit_scale": float(state["logit_scale"]) if "logit_scale" in state else None,
        "logit_bias": None if bias is None else float(bias),
        "unlocked_backbone_blocks": int(mcfg.backbone.get("trainable_blocks", 0) or 0),
        # unlocked blocks: the entry point would build the pretrained backbone without them (other embeddings)
        "loads_in_official_entry_point": bool(same_arch and cfg.tokenizer.kind == "clip_bpe" and not unlocked),
    }
    notes = []
    if not same_arch:
        notes.append(f"the architecture differs from {release.name}: build the official modules with the sizes above")
    if cfg.tokenizer.kind != "clip_bpe":
        notes.append(f"the text tower was trained on the {cfg.tokenizer.kind} tokenizer ({tok_name}), not the CLIP BPE "
                     "the official code uses: tokenize with it")
    if layout == "dinov2" and "logit_scale" in state:
        notes.append("the DINOv2 release layout has no logit_scale; its value is recorded here")
    if bias is not None:
        notes.append("trained with the sigmoid loss: add logit_bias (recorded here) to the logits for calibrated "
                     "pair probabilities; rankings and zero-shot argmaxes do not depend on it")
    if unlocked:
        notes.append(f"the backbone's last {report['unlocked_backbone_blocks']} blocks (and the modules after them) were "
                     f"trained: {prefix}_backbone_unlocked.pth holds them in the keys of the encoder dinotxt builds "
                     f"({', '.join(sorted(unlocked)[:2])}, ...; timm's, which for DINOv2 ViT-S/B/L equal the official "
                     "backbone's); load it over the pretrained backbone with load_state_dict(..., strict=False), or use "
                     "the model through dinotxt")
    report["notes"] = notes
    atomic_write_json(out / "export.json", report)
    report["out"] = str(out)
    return report


def export_safetensors(checkpoint: Union[str, Path], out: Optional[Union[str, Path]] = None,
                       include_backbone: bool = False, backbone_weights: Optional[str] = None,
                       trust_code: bool = False) -> Dict[str, object]:
    """Write a checkpoint as one self-describing safetensors file that ``dinotxt.load`` reads."""
    record = read_record(checkpoint, with_backbone=include_backbone and backbone_weights is None)
    cfg, state, tok_bytes = record.config, dict(record.state), record.tokenizer_bytes
    checkpoint = _local_name(checkpoint)
    if include_backbone:
        state.update({BACKBONE_PREFIX + k: v for k, v in backbone_state(record, backbone_weights, trust_code).items()})
    out = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + ".safetensors")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the .safetensors file to write")
    save_single_file(out, state, cfg, tok_bytes)
    return {"out": str(out), "tensors": len(state), "includes_backbone": include_backbone,
            "bytes": out.stat().st_size}


def export_checkpoint(checkpoint: Union[str, Path], fmt: str, out: Optional[Union[str, Path]] = None,
                      layout: Optional[str] = None, include_backbone: bool = False,
                      backbone_weights: Optional[str] = None, trust_code: bool = False) -> Dict[str, object]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    if fmt == "official":
        if include_backbone:
            raise ValueError("--include-backbone applies to --format safetensors; the official release keeps the "
                             "backbone in its own file (the DINOv2/DINOv3 pretrain .pth)")
        return export_official(checkpoint, out, layout)
    if layout is not None:
        raise ValueError("--layout applies to --format official")
    return export_safetensors(checkpoint, out, include_backbone, backbone_weights, trust_code)


__all__ = ["export_checkpoint", "export_official", "export_safetensors", "FORMATS"]
