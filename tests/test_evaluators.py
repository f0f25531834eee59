"""Evaluators: retrieval recall@k, linear probe, zero-shot, and how they are built."""
import jax
import numpy as np
import pytest

from recipes import get_config
from vlm_jax import config_util, evaluators, models
from vlm_jax.data import shapes, sources
from vlm_jax.evaluators import data as eval_data
from vlm_jax.evaluators import linear_probe, retrieval, zeroshot


def _brute_force_recall(img, txt, owner, k):
  """Reference: full argsort with ties broken by index (a stable sort)."""
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  sims = img @ txt.T
  i2t = []
  for i in range(len(img)):
    order = np.argsort(-sims[i], kind="stable")[:k]
    i2t.append(any(owner[j] == i for j in order))
  t2i = []
  for j in range(len(txt)):
    order = np.argsort(-sims[:, j], kind="stable")[:k]
    t2i.append(owner[j] in order)
  return np.mean(i2t), np.mean(t2i)


def test_recall_matches_a_full_sort_with_several_captions_per_image():
  rng = np.random.default_rng(0)
  n, d = 37, 8
  owner = np.concatenate([np.arange(n), rng.integers(0, n, size=50)])
  rng.shuffle(owner)
  img = rng.normal(size=(n, d))
  txt = img[owner] + 1.5 * rng.normal(size=(len(owner), d))
  got = retrieval.recall_at_k(img, txt, owner, ks=(1, 5, 10), chunk=7)
  for k in (1, 5, 10):
    i2t, t2i = _brute_force_recall(img, txt, owner, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t)
    assert got[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1


def test_an_image_is_found_by_any_of_its_captions():
  # Image 0 has captions 0 and 1; caption 1 is its exact match, caption 0 is not.
  img = np.eye(3)
  txt = np.array([[0, 1, 0.1], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
  owner = np.array([0, 0, 1, 2])
  r = retrieval.recall_at_k(img, txt, owner, ks=(1,))
  assert r["i2t_r1"] == 1.0
  # Caption 0 of image 0 points at image 1: text->image misses it.
  assert r["t2i_r1"] == pytest.approx(3 / 4)


def test_equal_embeddings_score_chance_not_perfect():
  n = 20
  r = retrieval.recall_at_k(np.ones((n, 4)), np.ones((n, 4)), np.arange(n), ks=(1, 5))
  assert r["i2t_r1"] == pytest.approx(1 / n) and r["t2i_r1"] == pytest.approx(1 / n)
  assert r["i2t_r5"] == pytest.approx(5 / n)


def test_recall_rejects_an_image_without_captions():
  with pytest.raises(ValueError, match="without one"):
    retrieval.recall_at_k(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


class _OneHotEncoder:
  """Embeds image i and caption "caption i" as the same one-hot vector."""

  def __init__(self, n):
    self.n = n

  def images(self, params, images, batch_size=None):
    del params, batch_size
    return np.eye(self.n)[np.asarray(images)[:, 0, 0, 0].astype(int)]

  def tokens(self, params, tokens, batch_size=None):
    del params, batch_size
    return np.eye(self.n)[np.asarray(tokens)[:, 0]]


class _Tok:
  def encode(self, texts):
    return np.array([[int(t.split()[-1])] for t in texts], np.int32)


def test_retrieval_evaluator_pairs_every_caption_with_its_image():
  c = get_config("siglip_shapes", "runlocal")
  n = 6
  images = np.zeros((n, 2, 2, 3), np.float32)
  images[:, 0, 0, 0] = np.arange(n)
  texts = [[f"caption {i}"] * (1 + i % 3) for i in range(n)]
  ev = retrieval.RetrievalEvaluator(c, None, data=dict(images=images, texts=texts),
                                    tokenizer=_Tok(), encoder=_OneHotEncoder(n))
  assert len(ev.texts) == sum(len(t) for t in texts)
  m = ev.run(None)
  assert set(m) == {f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  assert m["retrieval/i2t_r1"] == 1.0
  # Identical captions of one image tie; text->image still finds the image.
  assert m["retrieval/t2i_r1"] == 1.0


def test_ridge_matches_the_normal_equations():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(60, 5))
  y = rng.integers(0, 3, size=60)
  lam = 0.3
  (w, b), = linear_probe.fit_ridge(x, y, 3, [lam])
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  xc = xn - xn.mean(0)
  onehot = np.eye(3)[y]
  gram = xc.T @ xc
  w_ref = np.linalg.solve(gram + lam * np.trace(gram) / 5 * np.eye(5), xc.T @ (onehot - onehot.mean(0)))
  np.testing.assert_allclose(w, w_ref, rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(b, onehot.mean(0) - xn.mean(0) @ w_ref, rtol=2e-3, atol=2e-4)


def test_linear_probe_separates_separable_classes_and_picks_a_small_penalty():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(4, 16)) * 3
  y = rng.integers(0, 4, size=400)
  x = centres[y] + 0.5 * rng.normal(size=(400, 16))
  w, b, lam = linear_probe.select_and_fit(x[:300], y[:300], 4, (1e-3, 1e3))
  assert lam == 1e-3
  assert linear_probe.accuracy(w, b, x[300:], y[300:]) > 0.95
  # A huge penalty shrinks W to ~0: predictions collapse to the majority class.
  (w_big, b_big), = linear_probe.fit_ridge(x[:300], y[:300], 4, [1e6])
  assert linear_probe.accuracy(w_big, b_big, x[300:], y[300:]) < 0.5


def test_linear_probe_evaluator_on_shapes_colours():
  """Colour statistics as 'embeddings' tell the 8 colours apart but not the 6 kinds:
  the probe must beat chance (1/48) by far, up to about 1/6."""
  c = get_config("siglip_shapes", "runlocal")
  c.evals.linear_probe.num_train, c.evals.linear_probe.num_test = 300, 100

  class MeanColour:
    def images(self, params, images, batch_size=None):
      del params, batch_size
      im = np.asarray(images)
      fg = im.reshape(len(im), -1, 3)
      return np.concatenate([fg.mean(1), fg.max(1), fg.min(1)], axis=1)

  ev = linear_probe.LinearProbeEvaluator(c, None, encoder=MeanColour())
  assert ev.num_classes == 48 and len(ev.train) == 300
  assert ev.run(None)["linear_probe/top1"] > 4 / 48


def test_read_split_gives_the_sources_examples_and_captions():
  c = get_config("siglip_shapes", "runlocal")
  d = eval_data.read_split(c, c.evals.retrieval, "heldout", 5)
  src = shapes.ShapesSource("heldout", image_size=32)
  assert d["images"].shape == (5, 32, 32, 3) and d["images"].dtype == np.float32
  assert d["texts"] == [[src[i]["text"]] for i in range(5)]
  assert d["labels"].tolist() == [src[i]["label"] for i in range(5)]
  assert d["classnames"] == list(shapes.CLASSNAMES)


def test_tfds_source_gives_every_caption_of_an_example():
  src = object.__new__(sources.TfdsSource)
  src.name, src.split = "fake_captions", "val"
  src.image_key, src.text_key, src.label_key = "image", "captions/text", None
  img = np.zeros((4, 4, 3), np.uint8)
  src._ds = [{"image": img, "captions": {"text": np.array([b"a cat", b"a dog", b"two cats"],
                                                          dtype=object)}}]
  ex = src.read(0, all_texts=True)
  assert ex["texts"] == ["a cat", "a dog", "two cats"] and ex["text"] == "a cat"
  assert "texts" not in src[0]


def test_tfds_data_presets_fill_the_keys():
  d = evaluators.tfds_data("coco_captions", data_dir="/data")
  assert (d.source, d.tfds.text_key, d.tfds.split, d.tfds.data_dir) == (
      "tfds", "captions/text", "val", "/data")
  assert evaluators.tfds_data("cifar10").tfds.label_key == "label"
  with pytest.raises(ValueError, match="bogus"):
    evaluators.tfds_data("cifar10", bogus=1)


def test_zeroshot_prompts_use_an_before_vowels():
  class Recorder:
    def tokens(self, params, toks, batch_size=None):
      self.toks = toks
      return np.ones((len(toks), 2))

  class Tok:
    def encode(self, texts):
      Tok.texts = list(texts)
      return np.zeros((len(texts), 1), np.int32)

  zeroshot.class_embeddings(Recorder(), None, Tok(), ["orange ring", "red cross"], ["a {}."])
  assert Tok.texts == ["an orange ring.", "a red cross."]


def test_default_evaluators_and_their_metric_names():
  c = get_config("siglip_shapes", "runlocal")
  assert evaluators.enabled_names(c) == ["zeroshot", "retrieval"]
  assert evaluators.metric_names(c)[:2] == ["zeroshot/top1", "retrieval/i2t_r1"]
  c.evals.retrieval.enabled = False
  c.evals.zeroshot.enabled = False
  model = models.build(c.model)
  assert not evaluators.build_evaluators(c, model)


def test_built_evaluators_run_on_a_model_and_merge_metrics():
  c = get_config("siglip_shapes", "runlocal")
  c.evals.zeroshot.num_examples = 16
  c.evals.retrieval.num_examples = 16
  c.evals.linear_probe.enabled = True
  c.evals.linear_probe.num_train, c.evals.linear_probe.num_test = 32, 16
  model, variables = models.init(c, jax.random.PRNGKey(0))
  ev = evaluators.build_evaluators(c, model)
  assert ev.names == ["zeroshot", "retrieval", "linear_probe"]
  m = ev.run(variables["params"])
  assert sorted(m) == sorted(evaluators.metric_names(c))
  assert all(0.0 <= v <= 1.0 for v in m.values())


def test_unknown_evals_section_is_an_error_that_names_it():
  c = get_config("siglip_shapes", "runlocal")
  c.evals.zeroshott = c.evals.zeroshot
  with pytest.raises(ValueError, match="zeroshott"):
    evaluators.enabled_names(c)


def test_keep_best_metric_must_be_an_evaluated_metric():
  c = get_config("siglip_shapes", "runlocal")
  c.keep_best_metric = "linear_probe/top1"  # linear probe is off by default
  with pytest.raises(ValueError, match="keep_best_metric"):
    config_util.validate(c)
  c.keep_best_metric = "retrieval/t2i_r5"
  c.eval_every, c.checkpoint_every = 10, 4
  with pytest.raises(ValueError, match="checkpoint_every"):
    config_util.validate(c)
  c.checkpoint_every = 5
  config_util.validate(c)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_encoder_on_a_mesh_equals_one_device(axis_types):
  from vlm_jax import parallel  # pylint: disable=import-outside-toplevel
  from vlm_jax.evaluators.encoder import Encoder  # pylint: disable=import-outside-toplevel
  c = get_config("siglip_shapes", "runlocal")
  model, variables = models.init(c, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(10, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(2, 200, size=(10, c.model.text.max_len)).astype(np.int32)
  mesh = parallel.make_mesh([("data", 4), ("fsdp", 2)], axis_types=axis_types)
  one, sharded = Encoder(model, batch_size=8), Encoder(model, mesh=mesh, batch_size=8)
  np.testing.assert_allclose(sharded.images(variables["params"], images),
                             one.images(variables["params"], images), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sharded.tokens(variables["params"], tokens),
                             one.tokens(variables["params"], tokens), rtol=1e-5, atol=1e-5)
