"""The captions of a training source, read in order without decoding an image: what a SentencePiece
tokenizer is trained on (``dinotxt tokenizer train``, and a run that brings no tokenizer)."""
from __future__ import annotations

from typing import Dict, List, Optional

from omegaconf import DictConfig

from .sources import expand_shards, is_manifest, iter_tar_samples, read_manifest
from .stream import extract_caption


def training_captions(data: DictConfig, limit: int, cache_path: Optional[str] = None) -> List[str]:
    """Up to ``limit`` non-empty captions of ``data.train`` (tar shards or a manifest), or of the feature
    cache at ``cache_path`` when the run trains on the cache alone (``data.train`` unset)."""
    if data.train is None and cache_path:
        from .feature_cache import FeatureCache

        cache = FeatureCache(cache_path)
        captions: List[str] = []
        for name in cache.names:
            for raw in cache.index(name)["captions"]:
                caption = extract_caption({"__caption__": raw})
                if caption:
                    captions.append(caption)
                if len(captions) >= limit:
                    return captions
        return captions
    if is_manifest(data.train):
        rows = read_manifest(data.train, data.manifest_image_column, data.manifest_caption_column)
        return [c for _, c in rows[:limit] if c]
    errors: Dict[str, int] = {}
    captions = []
    for shard in expand_shards(data.train):
        for sample in iter_tar_samples(shard, errors):
            caption = extract_caption(sample, data.caption_key, data.caption_json_field)
            if caption:
                captions.append(caption)
            if len(captions) >= limit:
                return captions
    return captions


__all__ = ["training_captions"]
