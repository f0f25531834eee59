"""Data sources (TFDS via mock data, image folders) and image preprocessing."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import preprocess, sources


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- preprocessing


def test_decode_converts_grayscale_and_rgba_to_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = preprocess.decode_image(_png_bytes(grey))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # transparent pixel composites on white
    out = preprocess.decode_image(_png_bytes(rgba))
    assert out.shape == (2, 2, 3)
    assert tuple(out[1, 1]) == (200, 0, 0) and tuple(out[0, 0]) == (255, 255, 255)
    assert preprocess.decode_image(rgba).shape == (2, 2, 3)
    assert preprocess.decode_image(grey[..., None]).shape == (3, 4, 3)


def test_truncated_or_missing_images_raise_corrupt_example_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(preprocess.CorruptExampleError):
        preprocess.decode_image(truncated)
    with pytest.raises(preprocess.CorruptExampleError, match="nope.jpg"):
        preprocess.decode_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(preprocess.CorruptExampleError):
        preprocess.decode_image(b"not an image")
    with pytest.raises(preprocess.CorruptExampleError, match="float"):
        preprocess.decode_image(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("crop", preprocess.CROP_MODES)
def test_preprocess_output_shape_and_value_range(crop, value_range):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255
    out = preprocess.preprocess_image(img, image_size=24, crop=crop, value_range=value_range,
                                      rng=np.random.default_rng(0))
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    assert out.min() >= value_range[0] and out.max() <= value_range[1]
    full = preprocess.normalize(np.array([[[0, 255, 0]]], np.uint8), value_range)
    assert full.min() == value_range[0] and full.max() == value_range[1]


def test_center_crop_keeps_the_middle_and_resize_keeps_everything():
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20] = 255  # left third white
    center = preprocess.resize_crop(img, 20, "center")
    assert center.shape == (20, 20, 3) and center.max() == 0  # left third cropped away
    squashed = preprocess.resize_crop(img, 20, "resize")
    assert squashed[:, 0].min() == 255 and squashed[:, -1].max() == 0


def test_random_resized_crop_is_deterministic_given_the_seed():
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)

    def crop(seed):
        return preprocess.resize_crop(img, 16, "random_resized", rng=np.random.default_rng(seed))

    assert np.array_equal(crop(3), crop(3))
    assert not np.array_equal(crop(3), crop(4))
    with pytest.raises(ValueError, match="rng"):
        preprocess.resize_crop(img, 16, "random_resized")
    with pytest.raises(ValueError, match="pp.crop"):
        preprocess.resize_crop(img, 16, "zoom")


def test_flip_mirrors_left_right_with_the_rng():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255
    outs = {preprocess.preprocess_image(img, image_size=8, flip=True, rng=np.random.default_rng(s))[0, 0, 0]
            for s in range(20)}
    assert outs == {-1.0, 1.0}


# ---------------------------------------------------------------- folder source


def _write_folder(root, n=4, fmt="jsonl", labels=None):
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(np.full((10 + i, 12, 3), 20 * i, np.uint8)).save(root / name)
        row = {"image": name, "caption": f"caption {i}"}
        if labels:
            row["label"] = labels[i]
        rows.append(row)
    if fmt == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = list(rows[0])
        lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_source_reads_images_and_captions(tmp_path, fmt):
    _write_folder(tmp_path, fmt=fmt, labels=["dog", "cat", "dog", "bird"])
    src = sources.FolderSource(str(tmp_path), f"captions.{fmt}")
    assert len(src) == 4
    ex = src[2]
    assert ex["image"].shape == (12, 12, 3) and ex["image"][0, 0, 0] == 40
    assert ex["text"] == "caption 2"
    assert src.classnames == ["bird", "cat", "dog"] and ex["label"] == 2


def test_folder_source_decodes_lazily(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "img1.png").unlink()
    src = sources.FolderSource(str(tmp_path), None)  # finds captions.jsonl; no decode yet
    assert src[0]["text"] == "caption 0"
    with pytest.raises(preprocess.CorruptExampleError, match="img1.png"):
        src[1]


@pytest.mark.parametrize("content, match", [
    ('{"image": "a.png", "caption": "x"}\n{"image": "b.png"\n', r"captions.jsonl:2: invalid JSON"),
    ('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png"}\n', r"captions.jsonl:3: missing key 'caption'"),
    ('{"image": "a.png", "caption": ""}\n', r"captions.jsonl:1: missing or empty 'caption'"),
    ('["a.png", "x"]\n', r"captions.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "captions.jsonl").write_text(content)
    with pytest.raises(sources.CaptionsFileError, match=match):
        sources.FolderSource(str(tmp_path), "captions.jsonl")


def test_csv_without_caption_column_names_the_column_and_file(tmp_path):
    (tmp_path / "captions.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(sources.CaptionsFileError, match=r"captions.csv:1: missing column 'caption'"):
        sources.FolderSource(str(tmp_path), "captions.csv")
    (tmp_path / "captions.csv").write_text("image,caption\na.png,hello\nb.png,\n")
    with pytest.raises(sources.CaptionsFileError, match=r"captions.csv:3: missing or empty 'caption'"):
        sources.FolderSource(str(tmp_path), "captions.csv")


# ---------------------------------------------------------------- TFDS source


@pytest.fixture(scope="module")
def tfds_mock(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath

    pkg_dir = tmp_path_factory.mktemp("tfds_pkg")

    class VlmJaxTestCaptions(tfds.core.GeneratorBasedBuilder):
        """A captioned, labelled image dataset; mock_data fills it with random examples."""

        pkg_dir_path = epath.Path(pkg_dir)  # Metadata location (the test module is no package).
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["tabby_cat", "dog", "orange"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {}

    return tfds


def test_tfds_source_reads_captions_with_mock_data(tfds_mock):
    with tfds_mock.testing.mock_data(num_examples=6):
        src = sources.TfdsSource("vlm_jax_test_captions", "train", text_key="caption")
        assert len(src) == 6
        ex = src[3]
    assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3 and ex["image"].dtype == np.uint8
    assert isinstance(ex["text"], str) and ex["text"]
    assert 0 <= ex["label"] < 3
    assert src.classnames == ["tabby cat", "dog", "orange"]


def test_tfds_source_makes_captions_from_class_names(tfds_mock):
    with tfds_mock.testing.mock_data(num_examples=6):
        src = sources.TfdsSource("vlm_jax_test_captions", "train", caption_template="a photo of a {}.")
        texts = {(src[i]["label"], src[i]["text"]) for i in range(6)}
    expected = {0: "a photo of a tabby cat.", 1: "a photo of a dog.", 2: "a photo of an orange."}
    assert all(expected[lab] == text for lab, text in texts)


def test_tfds_source_names_a_missing_feature(tfds_mock):
    with tfds_mock.testing.mock_data(num_examples=2):
        with pytest.raises(KeyError, match="text_key='captions'"):
            sources.TfdsSource("vlm_jax_test_captions", "train", text_key="captions")
