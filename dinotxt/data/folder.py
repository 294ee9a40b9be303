"""Image-folder datasets (one sub-folder per class), as used for zero-shot evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG")
# a folder's image groups for group-robustness metrics: a CSV with path,label,group per image, the path
# relative to the folder (dinotxt.evaluation.zeroshot.read_groups; written by the spurious world)
GROUPS_FILE = "groups.csv"


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; classes sorted by folder name. Unreadable images raise
    a message naming the file."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.samples: List[Tuple[Path, int]] = []
        for idx, name in enumerate(self.classes):
            for f in sorted((self.root / name).iterdir()):
                if f.suffix in IMAGE_EXTENSIONS or f.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((f, idx))
        if not self.samples:
            raise ValueError(f"no images found under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return (self.transform(img) if self.transform else img), label
