"""Human-readable class names of the public label datasets the TFDS source knows.

A prepared TFDS dataset stores its ClassLabel names in its metadata, but not
always readably: imagenet2012 stores WordNet ids ("n01440764"), and a dataset
built without its metadata (e.g. TFDS mock data) has only "0", "1", ... The
TFDS source passes its names through ``readable`` so that zero-shot prompts,
confusion matrices and reports say "tench" and "airplane".

    readable("imagenet2012", ["n01440764", ...])  -> ["tench", ...]
    readable("cifar10", ["0", "1", ...])          -> ["airplane", "automobile", ...]
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")

# The fine labels of CIFAR-100, in label order (the dataset's meta file).
CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> dict[str, str]:
    """WordNet id -> name for the 1000 ImageNet-1k classes (imagenet2012_classnames.txt)."""
    path = os.path.join(os.path.dirname(__file__), "imagenet2012_classnames.txt")
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())


_BY_POSITION = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def readable(dataset: str, names: Sequence[str]) -> list[str]:
    """``names`` with WordNet ids and bare indices replaced by readable names.

    dataset: the TFDS name ("cifar10", "imagenet2012:5.1.0", ...). Names that are
    already readable, and datasets not known here, pass through unchanged.
    """
    base = dataset.split(":")[0].split("/")[0]
    names = [str(n) for n in names]
    table = _BY_POSITION.get(base)
    if table is not None and len(names) == len(table) and all(n.isdigit() for n in names):
        return [table[int(n)] for n in names]
    synsets = imagenet_synsets()
    if names and all(n in synsets for n in names):
        return [synsets[n] for n in names]
    return names
