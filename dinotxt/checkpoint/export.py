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
from typing import Dict, List, Optional, Union

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


def _split_extras(state: Dict[str, torch.Tensor]):
    """The heads' tensors, and apart what the official release has no place for (unlocked blocks, logit_bias)."""
    state = dict(state)
    unlocked = {k[len(UNLOCKED_PREFIX + "encoder."):]: state.pop(k) for k in [k for k in state if k.startswith(UNLOCKED_PREFIX)]}
    bias = state.pop("logit_bias", None)
    return state, unlocked, bias


def _save_pth(path: Path, tensors: Dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` (on the CPU, contiguous) as a ``torch.save`` file, atomically; returns its name."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def _write_official_files(out: Path, prefix: str, files: Dict[str, Dict[str, torch.Tensor]],
                          unlocked: Dict[str, torch.Tensor]) -> List[str]:
    """Write the release's weight files (and the unlocked blocks' own file); returns their names in order."""
    suffixes = {"vision_head": "_vision_head.pth", "text_encoder": "_text_encoder.pth",
                "weights": "_vision_head_and_text_encoder.pth"}
    written = [_save_pth(out / (prefix + suffixes[role]), tensors) for role, tensors in files.items()]
    if unlocked:
        written.append(_save_pth(out / (prefix + "_backbone_unlocked.pth"), unlocked))
    return written


def _same_architecture(mcfg, arch: Dict[str, object], release_cfg) -> bool:
    """Whether the model has the released architecture, the only one the official entry point builds."""
    return (str(mcfg.backbone.name).removesuffix("_qkvb") == release_cfg.backbone.name
            and arch["vision_head_blocks"] == release_cfg.vision_head.num_blocks
            and arch["text_width"] == release_cfg.text.width and arch["text_depth"] == release_cfg.text.depth
            and arch["text_heads"] == release_cfg.text.heads and arch["text_vocab_size"] == release_cfg.text.vocab_size
            and mcfg.vision_head.use_patch_tokens and mcfg.vision_head.pooling == "mean"
            and float(mcfg.vision_head.mlp_ratio) == 4.0 and float(mcfg.text.mlp_ratio) == 4.0)


def _export_report(layout: str, release_name: str, written: List[str], cfg, arch: Dict[str, object],
                   state: Dict[str, torch.Tensor], bias, unlocked: Dict[str, torch.Tensor], same_arch: bool
                   ) -> Dict[str, object]:
    """``export.json`` but for its notes: the files, the tokenizer, the architecture and what loads them."""
    mcfg = cfg.model
    return {
        "layout": layout,
        "official_release_layout": release_name,
        "files": written,
        "tokenizer": {"kind": str(cfg.tokenizer.kind), "file": str(cfg.tokenizer.file)},
        "architecture": arch,
        "logit_scale": float(state["logit_scale"]) if "logit_scale" in state else None,
        "logit_bias": None if bias is None else float(bias),
        "unlocked_backbone_blocks": int(mcfg.backbone.get("trainable_blocks", 0) or 0),
        # unlocked blocks: the entry point would build the pretrained backbone without them (other embeddings)
        "loads_in_official_entry_point": bool(same_arch and cfg.tokenizer.kind == "clip_bpe" and not unlocked),
    }


def _export_notes(report: Dict[str, object], release_name: str, same_arch: bool, unlocked: Dict[str, torch.Tensor],
                  prefix: str) -> List[str]:
    """What a user of the official code must know about these files, one sentence each."""
    tokenizer_kind, tok_name = report["tokenizer"]["kind"], report["tokenizer"]["file"]
    notes = []
    if not same_arch:
        notes.append(f"the architecture differs from {release_name}: build the official modules with the sizes above")
    if tokenizer_kind != "clip_bpe":
        notes.append(f"the text tower was trained on the {tokenizer_kind} tokenizer ({tok_name}), not the CLIP BPE "
                     "the official code uses: tokenize with it")
    if report["layout"] == "dinov2" and report["logit_scale"] is not None:
        notes.append("the DINOv2 release layout has no logit_scale; its value is recorded here")
    if report["logit_bias"] is not None:
        notes.append("trained with the sigmoid loss: add logit_bias (recorded here) to the logits for calibrated "
                     "pair probabilities; rankings and zero-shot argmaxes do not depend on it")
    if unlocked:
        notes.append(f"the backbone's last {report['unlocked_backbone_blocks']} blocks (and the modules after them) were "
                     f"trained: {prefix}_backbone_unlocked.pth holds them in the keys of the encoder dinotxt builds "
                     f"({', '.join(sorted(unlocked)[:2])}, ...; timm's, which for DINOv2 ViT-S/B/L equal the official "
                     "backbone's); load it over the pretrained backbone with load_state_dict(..., strict=False), or use "
                     "the model through dinotxt")
    return notes


def export_official(checkpoint: Union[str, Path], out: Optional[Union[str, Path]] = None,
                    layout: Optional[str] = None) -> Dict[str, object]:
    """Write a checkpoint's heads in the official dino.txt layout. Returns the ``export.json`` report.

    Args:
        checkpoint: checkpoint folder (or single file).
        out: output folder (default: ``<checkpoint>_official`` next to it).
        layout: ``dinov2`` (two files) or ``dinov3`` (one file); default from the backbone name.
    """
    from ..config import model_config

    record = read_record(checkpoint, with_backbone=False)
    cfg, tok_bytes = record.config, record.tokenizer_bytes
    checkpoint = _local_name(checkpoint)
    mcfg = cfg.model
    layout = layout or ("dinov3" if "dinov3" in str(mcfg.backbone.name) else "dinov2")
    state, unlocked, bias = _split_extras(record.state)
    files = official_state_dicts(state, layout)
    out = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + "_official")
    release = next(r for r in RELEASES.values() if r.layout == layout)
    arch = _architecture(mcfg, state)
    prefix = str(mcfg.arch or "dinotxt")
    written = _write_official_files(out, prefix, files, unlocked)
    atomic_write_bytes(out / str(cfg.tokenizer.file), tok_bytes)
    same_arch = _same_architecture(mcfg, arch, model_config(release.arch))
    report = _export_report(layout, release.name, written, cfg, arch, state, bias, unlocked, same_arch)
    report["notes"] = _export_notes(report, release.name, same_arch, unlocked, prefix)
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
