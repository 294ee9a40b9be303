"""Data reading for training and evaluation. Import-light: no Lightning here."""
from .sources import expand_shards, read_manifest
from .stream import ImageTextStream, collate_image_text
from .folder import ImageFolderDataset

__all__ = ["expand_shards", "read_manifest", "ImageTextStream", "collate_image_text", "ImageFolderDataset"]
