"""Image-text retrieval evaluation: Recall@K both ways (METHOD.md section 4).

With several captions per image (5 on COCO Karpathy and Flickr30k): a text query hits at K
when its own image is among the K most similar images; an image query hits at K when ANY of
its captions is among the K most similar texts. Ranks are computed by counting the
candidates that score strictly higher than the best correct one, chunked over queries so
the 5k x 25k COCO similarity matrix never has to be held twice.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = RECALL_KS, chunk: int = 1024) -> Dict[str, float]:
    """Recall@K for image->text and text->image.

    Args:
        image_features: (N, E) image embeddings (normalised for cosine similarity).
        text_features: (M, E) text embeddings.
        text_to_image: (M,) index of the image each text describes.
        ks: the K values.
        chunk: queries scored at a time (memory only).
    Returns:
        ``{"image_to_text_R@1": ..., "text_to_image_R@1": ..., ...}`` as fractions.
    """
    image_features, text_features = image_features.float(), text_features.float()
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=text_features.device)
    n, m = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape[0] != m:
        raise ValueError(f"text_to_image has {text_to_image.shape[0]} entries for {m} texts")
    if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError(f"text_to_image points outside the {n} images")
    # text -> image: rank of the text's own image among all images
    t2i_rank = torch.empty(m, dtype=torch.long)
    for s in range(0, m, chunk):
        sim = text_features[s:s + chunk] @ image_features.t()  # (c, N)
        own = sim.gather(1, text_to_image[s:s + chunk, None])
        t2i_rank[s:s + chunk] = (sim > own).sum(1).cpu()
    # image -> text: rank of the best-scoring caption of the image among all texts
    i2t_rank = torch.empty(n, dtype=torch.long)
    owner = text_to_image[None, :]
    for s in range(0, n, chunk):
        sim = image_features[s:s + chunk] @ text_features.t()  # (c, M)
        mine = owner == torch.arange(s, min(s + chunk, n), device=sim.device)[:, None]
        best_own = sim.masked_fill(~mine, float("-inf")).amax(1, keepdim=True)
        i2t_rank[s:s + chunk] = (sim > best_own).sum(1).cpu()
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((i2t_rank < k).double().mean()) if n else float("nan")
        out[f"text_to_image_R@{k}"] = float((t2i_rank < k).double().mean()) if m else float("nan")
    return out


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Normalised text embeddings of any model with ``encode_text`` (ours or open_clip's)."""
    device = device or next(model.parameters()).device
    feats = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[i:i + batch_size])).to(device)
        feats.append(torch.nn.functional.normalize(model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


@torch.no_grad()
def encode_images(model, dataset, batch_size: int = 64, num_workers: int = 0,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Normalised image embeddings of a dataset yielding ``(image tensor, index)``."""
    device = device or next(model.parameters()).device
    feats = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        feats.append(torch.nn.functional.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
    return torch.cat(feats)


def evaluate_retrieval(model, transform: Callable, tokenizer: Callable, dataset, batch_size: int = 64,
                       num_workers: int = 0, ks: Sequence[int] = RECALL_KS) -> Dict:
    """Recall@K both ways on a ``RetrievalDataset`` (see ``retrieval_dataset``)."""
    start = time.time()
    dataset.transform = transform
    images = encode_images(model, dataset, batch_size, num_workers)
    texts = encode_texts(model, tokenizer, dataset.texts)
    metrics = retrieval_recall(images, texts, torch.tensor(dataset.text_to_image), ks)
    metrics.update({
        "dataset": dataset.name,
        "num_images": len(dataset),
        "num_texts": len(dataset.texts),
        # a random ranking: one image of N first (t->i), or one of an image's c of M = cN captions first (i->t)
        "chance_R@1": 1.0 / max(1, len(dataset)),
        "skipped_samples": dict(getattr(dataset, "skipped", {}) or {}),
        "seconds": round(time.time() - start, 1),
    })
    return metrics
