"""Using a trained model: zero-shot prediction on image files, and image search."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from recipes import shared_run
from vlm_jax import checkpoint, inference, predict, search
from vlm_jax.data import tokenizers
from vlm_jax.numeric import normalize

LABELS = ["red circle", "blue square", "a green triangle"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The demo's runlocal SigLIP, trained 6 steps (``recipes.shared_run``)."""
  return shared_run(tmp_path_factory, "predict")


def _image(seed, size=(40, 28)):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Seven readable images (PNG, JPEG, grayscale, RGBA, palette; nested) and one
  corrupt file."""
  root = tmp_path_factory.mktemp("images")
  os.makedirs(root / "sub")
  Image.fromarray(_image(0)).save(root / "a.png")
  Image.fromarray(_image(1, (64, 64))).save(root / "b.jpg", quality=95)
  Image.fromarray(_image(2)[..., 0]).save(root / "c_gray.png")
  Image.fromarray(np.dstack([_image(3), np.full((28, 40), 128, np.uint8)])).save(
      root / "d_rgba.png")
  Image.fromarray(_image(4)).convert("P").save(root / "sub" / "e_palette.png")
  Image.fromarray(_image(5, (100, 30))).save(root / "sub" / "f.png")
  Image.fromarray(_image(6, (20, 20))).save(root / "sub" / "g.bmp")
  (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
  (root / "notes.txt").write_text("not an image")
  return str(root)


def _good(folder):
  return [p for p in search.list_images(folder) if not p.endswith("broken.png")]


# ----------------------------------------------------------------- predict ---

def test_label_prompts_fill_templates_and_keep_sentences():
  prompts = predict.label_prompts(["a orange ring", "cat", "my cat on a sofa."],
                                  ["a photo of a {}", "{}"])
  assert prompts == [["a photo of an orange ring", "orange ring"],
                     ["a photo of a cat", "cat"], ["my cat on a sofa."]]
  with pytest.raises(ValueError, match="no '{}'"):
    predict.label_prompts(["cat"], ["a photo"])


def test_predict_cli_json_scores_and_prompt_cache(run_dir, folder, tmp_path, monkeypatch,
                                                  capsys):
  images = _good(folder)[:4]
  calls = []
  real = inference.encode_texts
  monkeypatch.setattr(inference, "encode_texts",
                      lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
  argv = ["predict", "--workdir", run_dir, "--labels", ",".join(LABELS), "--json", *images]
  rows, errors = predict.cli(argv)
  printed = json.loads(capsys.readouterr().out)
  assert errors == [] and printed == rows
  assert [r["image"] for r in rows] == images
  for r in rows:
    assert list(r["scores"]) == LABELS
    assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 < v < 1 for v in r["scores"].values())
    assert r["label"] == max(r["scores"], key=r["scores"].get)
  # 3 labels x the shapes run's 4 zero-shot templates, encoded once, then cached.
  assert calls == [12]
  cached = os.listdir(os.path.join(run_dir, "cache"))
  assert len(cached) == 1 and cached[0].startswith("prompts_")
  rows2, _ = predict.cli(argv)
  assert calls == [12] and rows2 == rows
  # Other templates are another cache entry.
  predict.cli(argv[:-4] + ["--templates", "there is a {}", *images])
  assert calls == [12, 3] and len(os.listdir(os.path.join(run_dir, "cache"))) == 2
  # The table names every image with its best label.
  capsys.readouterr()
  predict.cli([a for a in argv if a != "--json"])
  table = capsys.readouterr().out.splitlines()
  assert len(table) == 1 + len(images)
  assert all(line.startswith(r["image"]) and r["label"] in line
             for line, r in zip(table[1:], rows))


def test_predictions_match_an_independent_computation(run_dir, folder):
  ckpt = checkpoint.load(run_dir)
  tok = tokenizers.build_tokenizer(ckpt.config.tokenizer)
  images = _good(folder)
  # Transparent pixels are documented to be composited on white.
  arrays = [np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, "white"),
                                             im.convert("RGBA")).convert("RGB"))
            for im in map(Image.open, images)]
  zimg = inference.encode_images(ckpt.model, ckpt.variables, arrays, normalize=True)
  prompts = predict.label_prompts(LABELS, predict.default_templates(ckpt.config))
  zcls = normalize(np.stack([
      inference.encode_texts(ckpt.model, ckpt.variables, row, tokenizer=tok,
                             normalize=True).mean(0) for row in prompts]))
  logits = float(np.exp(ckpt.params["t"][0])) * zimg @ zcls.T
  expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  probs = predict.zero_shot(ckpt.model, ckpt.variables, images, LABELS,
                            predict.default_templates(ckpt.config), tokenizer=tok)
  assert probs.shape == (len(images), len(LABELS))
  np.testing.assert_allclose(probs, expected, atol=1e-4)
  assert (probs.argmax(1) == expected.argmax(1)).all()
  assert len(set(np.round(probs[:, 0], 4))) > 1  # the images do get different scores


def test_predict_reports_unreadable_files_and_keeps_the_rest(run_dir, folder, capsys):
  broken = os.path.join(folder, "sub", "broken.png")
  missing = os.path.join(folder, "nope.png")
  good = _good(folder)[0]
  rows, errors = predict.cli(["predict", "--workdir", run_dir, "--labels", "red circle,blue square",
                              "--json", broken, good, missing])
  assert [r["image"] for r in rows] == [good]
  assert len(errors) == 2 and broken in errors[0] and missing in errors[1]
  assert broken in capsys.readouterr().err


def test_predict_explain_writes_the_predicted_labels_similarity_overlay(run_dir, folder,
                                                                          tmp_path):
  from vlm_jax import explain  # pylint: disable=import-outside-toplevel
  image = _good(folder)[1]  # b.jpg, 64x64
  out = str(tmp_path / "why")
  rows, _ = predict.cli(["predict", "--workdir", run_dir, "--labels", ",".join(LABELS),
                         "--explain", out, image])
  path = rows[0]["explanation"]
  assert path == os.path.join(out, "b.explain.png")
  picture = np.asarray(Image.open(path))
  array = np.asarray(Image.open(image).convert("RGB"))
  assert picture.shape == array.shape and not np.array_equal(picture, array)
  # The overlay is of the similarity to the predicted label's embedding.
  ckpt = checkpoint.load(run_dir)
  tok = tokenizers.build_tokenizer(ckpt.config.tokenizer)
  zcls = predict.label_embeddings(ckpt.model, ckpt.variables, LABELS,
                                  predict.default_templates(ckpt.config), tokenizer=tok)
  heat = explain.similarity_map(ckpt.model, ckpt.variables, array,
                                zcls[LABELS.index(rows[0]["label"])])
  np.testing.assert_array_equal(picture, explain.overlay(array, heat))


# ------------------------------------------------------------------ search ---

def test_index_resumes_and_query_finds_the_image_itself(run_dir, folder, tmp_path,
                                                        monkeypatch, capsys):
  index = str(tmp_path / "idx")
  subset = tmp_path / "subset"
  os.makedirs(subset)
  # An interrupted first run: only part of the folder was indexed.
  good = _good(folder)
  first = good[:3]
  real_list = search.list_images
  monkeypatch.setattr(search, "list_images", lambda f: first if f == str(subset) else real_list(f))
  out = search.cli(["search", "index", "--workdir", run_dir, "--images", str(subset),
                    "--index", index, "--shard_size", "2", "--batch_size", "2"])
  assert out["added"] == 3 and out["total"] == 3
  encoded = []
  real = inference.encode_images
  monkeypatch.setattr(inference, "encode_images",
                      lambda m, v, ims, **kw: encoded.append(len(ims)) or real(m, v, ims, **kw))
  out = search.cli(["search", "index", "--images", folder, "--index", index])
  assert sum(encoded) == len(good) - 3 and out["added"] == len(good) - 3
  assert out["total"] == len(good)
  assert len(out["skipped"]) == 1 and "broken.png" in out["skipped"][0]
  assert "broken.png" in capsys.readouterr().err
  emb, paths, manifest = search.load_embeddings(index)
  assert sorted(paths) == sorted(good) and emb.shape == (len(good), manifest["dim"])
  assert manifest["step"] == 6 and manifest["workdir"] == os.path.abspath(run_dir)
  # Nothing new: nothing encoded.
  encoded.clear()
  assert search.cli(["search", "index", "--images", folder, "--index", index])["added"] == 0
  assert encoded == []
  monkeypatch.undo()

  target = good[4]
  sheet = str(tmp_path / "sheet.png")
  res = search.cli(["search", "query", "--index", index, "--image", target, "-k", "5", "--json",
                    "--sheet", sheet])
  assert json.loads(capsys.readouterr().out) == res
  assert len(res) == 5 and all(set(r) == {"path", "score"} for r in res)
  assert res[0]["path"] == target and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
  scores = [r["score"] for r in res]
  assert scores == sorted(scores, reverse=True) and scores[1] < 0.9999
  with Image.open(sheet) as im:
    assert im.format == "PNG" and im.width > 300 and im.height > 100
    cell = np.asarray(im.convert("RGB"))[4:164, 4:164]  # the first result, scaled to its cell
  with Image.open(target) as small:
    assert max(small.size) < 160
    # A small image grows to fill the cell (the background is white): not a stamp in the middle.
    assert np.mean(np.all(cell == 255, -1)) < 0.9

  res = search.cli(["search", "query", "--index", index, "--text", "a red circle", "-k", "20"])
  assert sorted(r["path"] for r in res) == sorted(good)  # k > N gives all, sorted
  assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
  with pytest.raises(Exception, match="--text"):
    search.cli(["search", "query", "--index", index, "--text", "x", "--image", target])

  usearch = pytest.importorskip("usearch")
  del usearch
  for path in good[::3]:
    ann = search.cli(["search", "query", "--index", index, "--image", path, "-k", "3",
                      "--backend", "ann"])
    exact = search.cli(["search", "query", "--index", index, "--image", path, "-k", "3"])
    assert ann[0]["path"] == exact[0]["path"] == path
    assert ann[0]["score"] == pytest.approx(exact[0]["score"], abs=1e-6)
  assert os.path.isfile(os.path.join(index, "ann.usearch"))


def test_exact_topk_is_sorted_and_ties_break_by_row():
  emb = normalize(np.array([[1, 0], [0, 1], [1, 1], [1, 0], [-1, 0]], np.float32))
  rows, scores = search.exact_topk(emb, np.array([1, 0], np.float32), 3)
  assert rows.tolist() == [0, 3, 2]
  np.testing.assert_allclose(scores, [1, 1, np.sqrt(0.5)], atol=1e-6)


def test_ann_backend_without_usearch_names_the_extra(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_usearch(name, *a, **kw):
    if name.startswith("usearch"):
      raise ImportError("no usearch")
    return real_import(name, *a, **kw)
  monkeypatch.setattr(builtins, "__import__", no_usearch)
  with pytest.raises(ImportError, match=r"vlm_jax\[search\]"):
    search.AnnIndex.build(np.eye(3, dtype=np.float32))
