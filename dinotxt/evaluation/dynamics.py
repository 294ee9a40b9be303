"""Training-dynamics diagnostics of a contrastive image-text model, measured on a FIXED held-out set.

Every validation of a run (``eval.diagnostics``, logged by ``dinotxt.train.diagnostics``) embeds the
same N image-caption pairs and logs, under ``diagnostics/``:

- ``temperature``: ``exp(-logit_scale)``, the softmax temperature of the contrastive loss.
- ``alignment`` (Wang & Isola, ICML 2020, alpha = 2): ``mean_i ||x_i - y_i||^2`` over the N pairs of
  L2-normalised image embeddings x and caption embeddings y (0 = every pair coincides, 4 = opposite).
- ``uniformity_image`` / ``uniformity_text`` (same paper, t = 2): ``log mean_{i<j} exp(-2 ||u_i - u_j||^2)``
  over the distinct pairs of one modality (0 when all points coincide, lower = spread more evenly;
  about -4 for many points spread uniformly over a high-dimensional sphere, where ||u - v||^2 ~ 2).
- ``modality_gap`` (Liang et al., NeurIPS 2022): ``||mean_i x_i - mean_i y_i||``, the distance between
  the two centroids of the normalised embeddings.
- ``gap_variance_share``: the share of the variance of the pooled 2N normalised embeddings that lies
  BETWEEN the modalities: ``(N ||c_x - m||^2 + N ||c_y - m||^2) / sum_z ||z - m||^2`` with ``m`` the
  pooled mean (law of total variance: the rest is within-modality variance). It equals
  ``gap^2 / 4`` over the pooled total variance; 1 = each modality collapsed to its own point.
- ``effective_rank_image`` / ``effective_rank_text`` (Roy & Vetterli, EUSIPCO 2007): ``exp(H(p))`` with
  ``p_k = s_k / sum s`` the normalised singular values of one modality's CENTRED normalised embeddings
  (the centroid, which the gap already reports, is removed). At most ``min(N - 1, E)``: compare runs
  at the same N.
- ``localization`` (where label maps exist): for each caption, the similarities
  ``s_k = <p_k, t>`` of its image's L2-normalised head patch tokens ``p_k`` with the patch half of its
  normalised caption embedding (``model.dense_text``), the positive mass ``m_k = max(s_k, 0)``, and the
  share ``sum_k m_k a_k / sum_k m_k`` of it on the caption's object, where ``a_k`` in [0, 1] is the
  fraction of patch k's footprint covered by that object (its label-map pixels, pushed through the
  eval transform and averaged over the cell). Mean over the captions with a label map, an object in
  view and some positive mass. ``localization_uniform`` is what a uniform mass would score,
  ``mean_k a_k`` (the object's area share): the chance level to read it against.

Everything is computed in float64 from the model's embeddings, so a test recomputes each value from
the saved embeddings exactly (``eval.diagnostics_save``).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# the logged names, in the order ``dinotxt analyze`` shows them
DIAGNOSTICS = ("temperature", "alignment", "uniformity_image", "uniformity_text", "modality_gap",
               "gap_variance_share", "effective_rank_image", "effective_rank_text", "localization",
               "localization_uniform")


@dataclass
class DiagnosticSet:
    """The fixed held-out pairs: images through the eval transform, token ids, and per-patch object areas.

    Args:
        images: (N, 3, S, S) normalised images.
        ids: (N, L) token ids of the captions.
        captions: the N captions.
        areas: (N, h*w) float64 share of every patch cell covered by the caption's object, or None.
        has_map: (N,) bool, which samples came with a label map (rows of ``areas`` without one are 0).
        keys: the sample keys (for messages and saved files).
    """

    images: torch.Tensor
    ids: torch.Tensor
    captions: List[str]
    areas: Optional[torch.Tensor]
    has_map: torch.Tensor
    keys: List[str]

    def __len__(self) -> int:
        return len(self.captions)


def object_mask(labels: np.ndarray, meta: Optional[dict]) -> np.ndarray:
    """The caption's object in a label map: the first object's label when the sample's json names it
    (``label``, as the demo world writes), else every labelled pixel (not 0, not 255)."""
    if meta and isinstance(meta.get("label"), int):
        return labels == int(meta["label"])
    return (labels != 0) & (labels != 255)


def patch_areas(mask: np.ndarray, img_size: int, patch_size: int, resize_ratio: float = 256 / 224) -> torch.Tensor:
    """Share of every patch cell covered by ``mask`` (H, W) after the eval transform's geometry
    (resize the short side to ``round(img_size * resize_ratio)``, centre crop ``img_size``), flattened
    row-major like the head's patch tokens: (h * w,) float64."""
    from torchvision.transforms import functional as TF

    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    m = torch.from_numpy(mask.astype(np.float64))[None, None].float()
    m = TF.resize(m, int(round(img_size * resize_ratio)), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    m = TF.center_crop(m, img_size)
    cells = F.avg_pool2d(m.double(), patch_size)
    return cells.clamp(0, 1).flatten()


def load_diagnostic_set(shards, size: int, tokenizer: Callable, img_size: int, patch_size: int,
                        caption_key: str = "txt", caption_json_field: str = "caption",
                        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp")) -> DiagnosticSet:
    """The first ``size`` samples with an image and a caption of ``shards`` (a folder, a brace pattern or a
    list, read in order), the same every time. A sample's ``key.seg.png`` label map, when present, gives
    the patch areas of its object for the localisation diagnostic."""
    from PIL import Image

    from ..data.sources import expand_shards, iter_tar_samples
    from ..data.stream import extract_caption, sample_image
    from ..models.transforms import eval_transform

    if size < 2:
        raise ValueError(f"eval.diagnostics_size={size}: the diagnostics need at least 2 pairs")
    if isinstance(shards, Path):
        shards = str(shards)
    transform = eval_transform(img_size)
    images, captions, areas, has_map, keys = [], [], [], [], []
    errors: Dict[str, int] = {}
    for shard in expand_shards(shards, key="eval.diagnostics"):
        for sample in iter_tar_samples(shard, errors):
            caption = extract_caption(sample, caption_key, caption_json_field)
            try:
                image = sample_image(sample, image_keys)
            except Exception:
                image = None
            if image is None or not caption:
                continue
            meta = None
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except ValueError:
                    meta = None
            cells = None
            if "seg.png" in sample:
                labels = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
                if labels.shape[:2] != (image.height, image.width):
                    raise ValueError(f"label map of sample {sample['__key__']} in {shard} is {labels.shape[:2]} but its "
                                     f"image is {(image.height, image.width)}")
                cells = patch_areas(object_mask(labels, meta), img_size, patch_size)
            images.append(transform(image))
            captions.append(caption)
            areas.append(cells)
            has_map.append(cells is not None)
            keys.append(sample["__key__"])
            if len(images) == size:
                break
        if len(images) == size:
            break
    if len(images) < size:
        raise ValueError(f"eval.diagnostics has {len(images)} samples with an image and a caption in {shards}, "
                         f"fewer than eval.diagnostics_size={size}: lower the size or point it at more shards")
    grid = (img_size // patch_size) ** 2
    area_tensor = None
    if any(has_map):
        area_tensor = torch.stack([a if a is not None else torch.zeros(grid, dtype=torch.float64) for a in areas])
    return DiagnosticSet(torch.stack(images), tokenizer(captions), captions, area_tensor,
                         torch.tensor(has_map, dtype=torch.bool), keys)


@torch.no_grad()
def embed_diagnostic_set(model, dset: DiagnosticSet, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """The model's raw (unnormalised) image embeddings ``image`` (N, E), caption embeddings ``text`` (N, E)
    and, for a head with patch tokens, its head patch tokens ``patches`` (N, h*w, D), on the CPU, plus
    ``logit_scale`` (the log temperature). One backbone pass per image serves both the embedding and the
    patch tokens (what ``encode_image`` and ``encode_patches`` compute separately)."""
    param = next(model.parameters())
    head = model.vision_head
    dense = bool(getattr(head, "use_patch_tokens", False))
    image, text, patches = [], [], []
    for i in range(0, len(dset), batch_size):
        x = dset.images[i:i + batch_size].to(param.device, param.dtype)
        cls, tokens = head.forward_tokens(model.backbone(x))
        image.append(head.embed(cls, tokens).float().cpu())
        if dense:
            patches.append(tokens.float().cpu())
        text.append(model.encode_text(dset.ids[i:i + batch_size].to(param.device)).float().cpu())
    out = {"image": torch.cat(image), "text": torch.cat(text),
           "logit_scale": model.logit_scale.detach().double().cpu().reshape(())}
    if dense:
        out["patches"] = torch.cat(patches)
    return out


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    """``mean_i ||x_i - y_i||^2`` of paired normalised embeddings (Wang & Isola, alpha = 2)."""
    return float((x - y).pow(2).sum(1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over distinct pairs of normalised embeddings."""
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(0)
    i, j = torch.triu_indices(n, n, offset=1)
    return float(torch.logsumexp(-t * d2[i, j], 0) - math.log(len(i)))


def modality_gap(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Centroid distance of two sets of normalised embeddings and the between-modality share of the
    pooled variance (see the module docstring)."""
    cx, cy = x.mean(0), y.mean(0)
    pooled = torch.cat([x, y])
    total = (pooled - pooled.mean(0)).pow(2).sum(1).mean()
    gap = float((cx - cy).norm())
    return {"modality_gap": gap, "gap_variance_share": float((cx - cy).pow(2).sum() / 4 / total)}


def effective_rank(x: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values of the centred ``x`` (Roy & Vetterli)."""
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def localization(patches: torch.Tensor, dense_text: torch.Tensor, areas: torch.Tensor,
                 has_map: torch.Tensor) -> Dict[str, float]:
    """Share of each caption's positive patch-similarity mass on its object, and the uniform-mass level.

    Args:
        patches: (N, P, D) normalised head patch tokens.
        dense_text: (N, D) normalised patch halves of the caption embeddings.
        areas: (N, P) object share of every patch cell.
        has_map: (N,) which captions have a label map.
    """
    mass = torch.einsum("npd,nd->np", patches, dense_text).clamp_min(0)
    total = mass.sum(1)
    use = has_map & (areas.sum(1) > 0) & (total > 0)
    if not bool(use.any()):
        return {"localization": float("nan"), "localization_uniform": float("nan")}
    share = (mass * areas).sum(1)[use] / total[use]
    return {"localization": float(share.mean()), "localization_uniform": float(areas[use].mean(1).mean())}


def dynamics_metrics(embeddings: Dict[str, torch.Tensor], areas: Optional[torch.Tensor] = None,
                     has_map: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Every diagnostic of the module docstring from ``embed_diagnostic_set`` output, in float64."""
    x = F.normalize(embeddings["image"].double(), dim=-1)
    y = F.normalize(embeddings["text"].double(), dim=-1)
    out = {"temperature": float(torch.exp(-embeddings["logit_scale"].double())),
           "alignment": alignment(x, y), "uniformity_image": uniformity(x), "uniformity_text": uniformity(y),
           **modality_gap(x, y), "effective_rank_image": effective_rank(x), "effective_rank_text": effective_rank(y)}
    patches = embeddings.get("patches")
    if patches is not None and areas is not None and has_map is not None:
        dim = patches.shape[-1]
        text = embeddings["text"].double()
        if text.shape[-1] == 2 * dim:  # [CLS half, patch half] (dino.txt); a CLS-only head has no patch half
            p = F.normalize(patches.double(), dim=-1)
            out.update(localization(p, F.normalize(text[:, dim:], dim=-1), areas.double(), has_map))
    return out
