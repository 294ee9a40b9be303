"""A Waterbirds-style split of the procedural world: a spurious background correlated with the class.

Sagawa et al. (ICLR 2020) put land and water birds on land and water backgrounds, matched in 95% of
the training images and balanced in test, and report the accuracy of the worst (class, background)
group next to the average. Here every image shows ONE object; its class is its SHAPE (the four
``SHAPES``, colours at random), and a background attribute is tied to it: class ``i`` owns attribute
value ``i``,

- ``texture``: striped (circle), checkered (square), dotted (triangle), noisy (star);
- ``tint``: a reddish, greenish, bluish or yellowish cast over a random texture.

In the training split the background is the class's own in exactly ``rate`` of each class's images
(rounded), one of the other three values (in turn) in the rest; the held-out split does the same with
``test_rate`` (default ``1 - rate``: anti-correlated, most test images sit in the groups that were
rare in training). A model that learned the background instead of the shape fails there.

Layout (the world's, so training and the segmentation evaluation read it as they read the world)::

    ROOT/train/*.tar            training pairs (captions as the world's: shape, colour, often the texture)
    ROOT/eval/*.tar             held-out pairs with label maps (key.json carries "group")
    ROOT/eval/classes/<shape>/  the held-out images as a zero-shot folder
    ROOT/eval/classes/groups.csv  path,label,group per image: "circle/0000000000003.jpg,circle,circle|dotted"
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional

from .world import SHAPES, write_split

TEXTURES = ["striped", "checkered", "dotted", "noisy"]  # TEXTURES[i] is SHAPES[i]'s own background
TINTS = {"reddish": (55, -25, -25), "greenish": (-25, 50, -25), "bluish": (-25, -25, 55), "yellowish": (45, 45, -40)}
ATTRIBUTES = {"texture": TEXTURES, "tint": list(TINTS)}


def spurious_plan(num: int, seed: int, attribute: str = "texture", rate: float = 0.95) -> List[Dict]:
    """What each of ``num`` samples shows: the classes in turn (balanced), and in each class exactly
    ``round(rate * n_class)`` samples (chosen with ``seed``) on the class's own attribute value."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"data.world.spurious.attribute={attribute!r} is not one of {', '.join(ATTRIBUTES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.world.spurious rate {rate} must lie in [0, 1]")
    values = ATTRIBUTES[attribute]
    rng = random.Random(seed)
    plan: List[Optional[Dict]] = [None] * num
    for c, shape in enumerate(SHAPES):
        members = list(range(c, num, len(SHAPES)))
        rng.shuffle(members)
        own = round(rate * len(members))
        others = [v for v in values if v != values[c]]
        for j, i in enumerate(members):
            value = values[c] if j < own else others[(j - own) % len(others)]
            render = {"shape": shape, "background": value} if attribute == "texture" else {"shape": shape, "tint": TINTS[value]}
            plan[i] = {"render": render, "class": shape, "group": f"{shape}|{value}", "own": value == values[c]}
    return plan


def write_spurious_world(root: str, num_train: int = 4096, num_eval: int = 480, size: int = 128,
                         samples_per_shard: int = 512, seed: int = 0, attribute: str = "texture", rate: float = 0.95,
                         test_rate: Optional[float] = None) -> Dict[str, List[str]]:
    """The training split (background = class's own at ``rate``) and the held-out split (at ``test_rate``,
    default ``1 - rate``) with its zero-shot folder and ``groups.csv`` (see the module docstring)."""
    root = Path(root)
    test_rate = 1.0 - rate if test_rate is None else test_rate
    train = write_split(root / "train", num_train, seed * 2 + 0, size, samples_per_shard, 1,
                        plan=spurious_plan(num_train, seed * 2 + 0, attribute, rate), folder_classes=list(SHAPES))
    evals = write_split(root / "eval", num_eval, seed * 2 + 1, size, samples_per_shard, 1, image_folder=True,
                        plan=spurious_plan(num_eval, seed * 2 + 1, attribute, test_rate), folder_classes=list(SHAPES))
    (root / "classnames.txt").write_text("\n".join(SHAPES) + "\n")
    return {"train": train, "eval": evals}
