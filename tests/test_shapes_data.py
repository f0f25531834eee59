"""The embedded shapes dataset: determinism, labels that match captions and pixels, splits."""

import hashlib
import time

import numpy as np
import pytest
from scipy import ndimage

from vlm_jax.data import shapes


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_same_split_and_index_give_the_same_example():
    a, b = shapes.ShapesSource("train", seed=7), shapes.ShapesSource("train", seed=7)
    for i in (0, 1, 12345, 99_999_999):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"])
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
    assert not np.array_equal(a[0]["image"], shapes.ShapesSource("train", seed=8)[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_example_fields_types_and_image_format():
    ex = shapes.ShapesSource("train")[3]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["text"], str) and ex["text"]
    assert 0 <= ex["label"] < len(shapes.CLASSNAMES)
    assert ex["texture"] in shapes.TEXTURES and ex["size"] in shapes.SIZES
    assert ex["count"] in (1, 2, 3)
    assert ex["position"] in shapes.POSITIONS or (ex["position"] == "" and ex["count"] > 1)


def test_caption_names_the_label_colour_and_kind():
    src = shapes.ShapesSource("train")
    for i in range(300):
        ex = src[i]
        colour, kind = shapes.CLASSNAMES[ex["label"]].split(" ")
        assert (ex["colour"], ex["kind"]) == (colour, kind)
        words = ex["text"].replace(",", " ").split()
        assert colour in words, ex["text"]
        assert kind in words or shapes.KIND_PLURALS[kind] in words, ex["text"]
        if ex["count"] > 1:
            assert shapes.KIND_PLURALS[kind] in words, ex["text"]


def test_image_holds_count_objects_of_the_label_colour():
    # Pixels close to the class colour form exactly `count` blobs: the rendering
    # agrees with the label, and the objects do not merge.
    src = shapes.ShapesSource("heldout")
    for i in range(150):
        ex = src[i]
        ref = np.array(shapes.COLOURS[ex["colour"]], np.float32)
        dist = np.linalg.norm(ex["image"].astype(np.float32) - ref, axis=-1)
        mask = dist < 40
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == ex["count"], (i, ex["text"], n)
        assert mask.sum() >= 20 * ex["count"], (i, ex["text"])  # objects are big enough to see


def test_heldout_images_are_disjoint_from_train():
    train = shapes.ShapesSource("train")
    held = shapes.ShapesSource("heldout")
    assert len(held) < 10_000 <= 10**7 <= len(train)
    train_digests = {_digest(train[i]["image"]) for i in range(2000)}
    held_digests = {_digest(held[i]["image"]) for i in range(500)}
    assert not train_digests & held_digests
    assert len(held_digests) == 500


def test_at_least_40_distinct_classes_all_drawn():
    assert len(shapes.CLASSNAMES) >= 40
    assert len(set(shapes.CLASSNAMES)) == len(shapes.CLASSNAMES)
    held = shapes.ShapesSource("heldout")
    labels = {held[i]["label"] for i in range(1500)}
    assert labels == set(range(len(shapes.CLASSNAMES)))


def test_class_prompts_fill_templates_with_correct_articles():
    prompts = shapes.class_prompts()
    assert len(prompts) == len(shapes.CLASSNAMES)
    assert all(len(p) == len(shapes.ZEROSHOT_TEMPLATES) for p in prompts)
    orange_ring = prompts[shapes.CLASSNAMES.index("orange ring")]
    assert "a photo of an orange ring" in orange_ring
    assert "an orange ring" in orange_ring and "a orange ring" not in orange_ring
    assert "a photo of a red triangle" in prompts[shapes.CLASSNAMES.index("red triangle")]
    with pytest.raises(ValueError, match="placeholder"):
        shapes.class_prompts(templates=["no slot"])


def test_image_size_is_configurable_and_validated():
    ex = shapes.ShapesSource("train", image_size=64)[5]
    assert ex["image"].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="image_size"):
        shapes.ShapesSource("train", image_size=8)
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesSource("validation")
    with pytest.raises(IndexError):
        shapes.ShapesSource("heldout", num_examples=10)[10]


def test_render_speed_is_reported():
    src = shapes.ShapesSource("train")
    n = 500
    t = time.perf_counter()
    images = [src[i]["image"] for i in range(n)]
    rate = n / (time.perf_counter() - t)
    print(f"\nshapes render: {rate:.0f} images/s at 32x32 on one core")
    assert all(im.shape == (32, 32, 3) for im in images)
