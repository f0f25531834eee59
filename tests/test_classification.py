"""The classification task: class folders, labels, the loss and its gradients on any mesh,
accumulation, evaluation (top-1/top-5/loss, confusion matrix) and the evaluate CLI."""
import json
import os

import flax
import jax
import numpy as np
import optax
import pytest
from PIL import Image

from recipes import get_config, override
from vlm_jax import checkpoint, evaluate, models, parallel, train
from vlm_jax.data import pipeline, sources
from vlm_jax.evaluators import classification as cls_eval
from vlm_jax.tasks import classification, contrastive

BATCH = 16
SGD = optax.sgd(0.5)
# Compile time dominates the step tests: XLA's CPU backend optimisations are off
# (the SPMD partitioning under test is not), as in test_parallel.py.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CLASSES = ("cat", "dog", "frog")


def write_class_folder(root, n_train=8, n_val=4, size=(12, 10), classes=CLASSES, seed=0):
  """DIR/train/<class>/*.png and DIR/val/<class>/*.jpg: each class a distinct colour."""
  rs = np.random.RandomState(seed)
  for split, n, ext in (("train", n_train, ".png"), ("val", n_val, ".jpg")):
    for c, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        colour = np.zeros(3)
        colour[c % 3] = 200
        img = np.clip(colour + rs.randint(0, 40, size + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:03d}{ext}"))
  return str(root)


def _config(folder=None, **overrides):
  c = get_config("vit_cifar10", "runlocal")
  c.batch_size = BATCH
  c.data.num_threads = 0
  c.model.image.image_size = c.pp.image_size = 16
  # Deterministic targets unless a test turns mixing on (the recipe mixes).
  c.classification.mixup_alpha = c.classification.cutmix_alpha = 0.0
  if folder is not None:
    c.data.source = "folder"
    c.data.folder.path = folder
  return override(c, overrides)


# ------------------------------------------------------------------ data ---

def test_class_folder_lists_sorted_classes_and_labels_by_name(tmp_path):
  root = write_class_folder(tmp_path / "d", classes=("zebra", "ant", "moth"))
  os.makedirs(tmp_path / "d" / "train" / ".hidden")
  (tmp_path / "d" / "train" / "ant" / "notes.txt").write_text("not an image")
  src = sources.ClassFolderSource(root, "train")
  assert src.classnames == ["ant", "moth", "zebra"] and len(src) == 24
  ex = src[0]
  assert ex["label"] == 0 and ex["path"].endswith(os.path.join("ant", "000.png"))
  assert ex["image"].shape == (12, 10, 3) and ex["text"] == "a photo of an ant."
  val = sources.ClassFolderSource(root, "val")
  assert val.classnames == src.classnames and len(val) == 12
  assert sorted(set(val.labels.tolist())) == [0, 1, 2]


def test_the_val_split_is_found_under_its_usual_names(tmp_path):
  root = write_class_folder(tmp_path / "d")
  os.rename(os.path.join(root, "val"), os.path.join(root, "test"))
  assert len(sources.ClassFolderSource(root, "val")) == 12
  c = _config(root)
  assert sources.default_eval_split(c.data) == "val"
  assert isinstance(sources.build_source(c.data, "val"), sources.ClassFolderSource)


def test_class_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="train"):
    sources.build_source(_config(str(tmp_path)).data)
  root = write_class_folder(tmp_path / "d")
  os.makedirs(os.path.join(root, "val", "horse"))
  with pytest.raises(ValueError, match="horse"):
    sources.ClassFolderSource(root, "val")
  empty = tmp_path / "e" / "train" / "a"
  os.makedirs(empty)
  with pytest.raises(ValueError, match="no images"):
    sources.ClassFolderSource(str(tmp_path / "e"), "train")


def test_a_captions_file_keeps_the_image_caption_meaning(tmp_path):
  root = write_class_folder(tmp_path / "d")
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    f.write(json.dumps({"image": "train/cat/000.png", "caption": "a cat"}) + "\n")
  src = sources.build_source(_config(root).data)
  assert isinstance(src, sources.FolderSource) and len(src) == 1


def test_batches_hold_images_and_int_labels(tmp_path):
  root = write_class_folder(tmp_path / "d")
  c = _config(root)
  classification.prepare_config(c)
  batch = next(iter(classification.train_dataset(c)))
  assert batch["image"].shape == (BATCH, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
  with pytest.raises(ValueError, match="label"):
    pipeline.label_collate([{"image": np.zeros((2, 2, 3)), "label": -1}])


def test_num_classes_comes_from_the_data_and_a_wrong_one_is_named(tmp_path):
  c = _config(write_class_folder(tmp_path / "d"))
  assert c.model.num_classes is None
  classification.prepare_config(c)
  assert c.model.num_classes == 3
  assert isinstance(models.build(c.model), models.ImageClassifier)
  c.model.num_classes = 5
  with pytest.raises(ValueError, match="num_classes=5"):
    classification.prepare_config(c)
  s = get_config("siglip_shapes", "runlocal")
  s.model.num_classes = 3
  with pytest.raises(ValueError, match="num_classes"):
    contrastive.prepare_config(s)


# ------------------------------------------------------------ the step ---

def _state_and_batch(c, mesh):
  classification.prepare_config(c)
  model = models.build(c.model)
  shardings = train.train_state_shardings(c, model, SGD, mesh)
  variables = models.init(c, jax.random.PRNGKey(0))[1]
  params = dict(variables).pop("params")
  # A head that is not zero, so that the encoder gets gradients too.
  params = jax.tree.map(lambda x: x + 0.05 * np.random.RandomState(x.size % 97).randn(*x.shape)
                        .astype(np.float32), params)
  state = train.TrainState(step=np.zeros((), np.int32), params=params,
                           opt_state=SGD.init(params), rng=np.asarray(jax.random.PRNGKey(1)),
                           model_state={k: v for k, v in variables.items() if k != "params"})
  batch = next(iter(classification.train_dataset(c)))
  return model, jax.device_put(state, shardings), shardings, parallel.global_batch(batch, mesh)


def _one_step(c, mesh_shape):
  spec = list(zip(("data", "fsdp", "tensor"), mesh_shape))
  devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
  mesh = parallel.make_mesh(spec, devices=devices)
  model, state, shardings, batch = _state_and_batch(c, mesh)
  step = train.make_train_step(c, model, SGD, lambda _: 0.5, mesh, shardings)
  new, metrics = step.lower(state, batch).compile(_FAST)(state, batch)
  return jax.device_get(new), jax.device_get(metrics)


def assert_same_state(a, b, rtol=1e-5, atol=1e-6):
  (sa, ma), (sb, mb) = a, b
  np.testing.assert_allclose(ma["train/loss"], mb["train/loss"], rtol=rtol)
  np.testing.assert_allclose(ma["train/accuracy"], mb["train/accuracy"], rtol=rtol)
  for tree_a, tree_b in ((sa.params, sb.params), (sa.model_state, sb.model_state)):
    fa, fb = (flax.traverse_util.flatten_dict(t, sep="/") for t in (tree_a, tree_b))
    assert fa.keys() == fb.keys()
    for k in fa:
      np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_a_classification_step_on_a_mesh_equals_one_device(shape):
  c = _config(**{"classification.label_smoothing": 0.1})
  one = _one_step(c, (1, 1, 1))
  assert one[1]["train/grad_norm"] > 1e-4
  assert_same_state(_one_step(_config(**{"classification.label_smoothing": 0.1}), shape), one)


def test_accumulated_micro_batches_equal_one_big_batch():
  big = _one_step(_config(), (1, 1, 1))
  assert_same_state(_one_step(_config(grad_accum_steps=4), (1, 1, 1)), big)
  assert_same_state(_one_step(_config(grad_accum_steps=2), (4, 2, 1)), big)


def test_label_smoothing_and_mixup_change_the_loss_but_not_the_accuracy():
  plain = _one_step(_config(), (1, 1, 1))[1]
  smooth = _one_step(_config(**{"classification.label_smoothing": 0.3}), (1, 1, 1))[1]
  mixed = _one_step(_config(**{"classification.mixup_alpha": 1.0,
                               "classification.cutmix_alpha": 1.0}), (1, 1, 1))[1]
  assert abs(smooth["train/loss"] - plain["train/loss"]) > 1e-4
  assert abs(mixed["train/loss"] - plain["train/loss"]) > 1e-4
  # Accuracy is against the true labels of the unmixed batch, from the same logits
  # for the unmixed runs.
  assert smooth["train/accuracy"] == plain["train/accuracy"]
  with pytest.raises(ValueError, match="label_smoothing"):
    _one_step(_config(**{"classification.label_smoothing": 1.5}), (1, 1, 1))


# ----------------------------------------------------------- evaluation ---

def test_topk_and_confusion_matrix_follow_their_definitions():
  logits = np.array([[3., 2., 1., 0.], [0., 1., 2., 3.], [1., 3., 2., 0.]])
  labels = np.array([1, 3, 2])
  assert cls_eval.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert cls_eval.topk_accuracy(logits, labels, 2) == pytest.approx(1.0)
  assert cls_eval.topk_accuracy(logits, labels, 10) == 1.0
  m = cls_eval.confusion_matrix(labels, np.argmax(logits, 1), 4)
  assert m[1, 0] == 1 and m[3, 3] == 1 and m[2, 1] == 1 and m.sum() == 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert cls_eval.cross_entropy(logits, labels) == pytest.approx(
      -np.mean(np.log(p[np.arange(3), labels])))


def test_training_on_a_class_folder_logs_val_metrics_and_evaluate_reproduces_them(tmp_path):
  root = write_class_folder(tmp_path / "d")
  wd = str(tmp_path / "run")
  c = _config(root, total_steps=30, eval_every=15, checkpoint_every=15, log_every=15,
              **{"optimizer.lr": 3e-3, "optimizer.warmup_steps": 3})
  last = train.train_and_evaluate(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "val/top1" in r]
  assert [r["step"] for r in evals] == [15, 30]
  for r in evals:
    assert 0 <= r["val/top1"] <= r["val/top5"] <= 1 and r["val/loss"] > 0
  assert last["val/top1"] >= 0.9  # three colours are easy
  assert os.path.isfile(os.path.join(wd, "confusion", "step_30.png"))
  assert Image.open(os.path.join(wd, "confusion", "step_30.png")).size[0] > 100
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["model"]["num_classes"] == 3
  ck = checkpoint.load(wd)
  assert ck.step == 30 and isinstance(ck.model, models.ImageClassifier)
  row = evaluate.cli(["evaluate", "--workdir", wd])
  for k in ("val/top1", "val/top5", "val/loss"):
    assert row[k] == pytest.approx(last[k], abs=1e-6), k


# Tiny encoders of every image-tower type (the ViT above is the fourth).
ENCODERS = {
    "resnet_batchnorm": {"model.image.type": "resnet", "model.image.variant": "18",
                         "model.image.stage_depths": (1, 1), "model.image.base_width": 8,
                         "model.image.zero_init_residual": False},
    "resnet50_bottleneck": {"model.image.type": "resnet", "model.image.variant": "50",
                            "model.image.stage_depths": (1, 1), "model.image.base_width": 4,
                            "model.image.zero_init_residual": False},
    "bit_groupnorm": {"model.image.type": "bit", "model.image.variant": "50x1",
                      "model.image.stage_depths": (1, 1)},
    "convnext": {"model.image.type": "convnext", "model.image.stage_depths": (1, 1),
                 "model.image.widths": (16, 32), "model.image.layer_scale_init": 0.5},
    "clip_resnet": {"model.image.type": "clip_resnet", "model.image.variant": None,
                    "model.image.stage_depths": (1, 1, 1, 1), "model.image.width": 8,
                    "model.image.num_heads": 2, "model.image.image_size": 32,
                    "pp.image_size": 32},
    "hybrid_vit": {"model.image.stem": "resnet", "model.image.stem_depths": (1,),
                   "model.image.patch_size": 1},
}


# GroupNorm (BiT) and the hybrid ViT's stem hold no statistic across examples: the
# encoders whose sharded step could differ from one device (BatchNorm over the global
# batch, attention pooling, layer scale) are the ones compared here; every encoder
# type has its own tests (BiT and the hybrid stem: test_resnet.py).
MESH_ENCODERS = ("clip_resnet", "convnext", "resnet50_bottleneck", "resnet_batchnorm")


@pytest.mark.parametrize("encoder", MESH_ENCODERS)
def test_every_encoder_type_trains_on_8_devices_as_on_one(encoder):
  """Including BatchNorm: its statistics are over the global batch on any mesh."""
  one = _one_step(_config(**ENCODERS[encoder]), (1, 1, 1))
  assert one[1]["train/grad_norm"] > 1e-4
  if encoder.startswith("resnet"):
    stats = one[0].model_state["batch_stats"]
    assert stats and any(np.abs(v).max() > 0 for v in jax.tree.leaves(stats))
  assert_same_state(_one_step(_config(**ENCODERS[encoder]), (8, 1, 1)), one, rtol=2e-5)


@pytest.mark.parametrize("name,num,first", [("cifar10", 10, "airplane"),
                                            ("cifar100", 100, "apple"),
                                            ("imagenet2012", 1000, "tench")])
def test_tfds_label_datasets_give_readable_names_and_labelled_batches(name, num, first):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = _config(**{"data.source": "tfds", "data.tfds.name": name})
  with tfds.testing.mock_data(num_examples=BATCH, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.build_source(c.data)
    classification.prepare_config(c)
    batch = next(iter(classification.train_dataset(c)))
  assert src.classnames[0] == first and len(set(src.classnames)) == num
  assert c.model.num_classes == num
  assert batch["label"].shape == (BATCH,) and 0 <= batch["label"].min() <= batch["label"].max() < num
  assert sources.default_eval_split(c.data) == ("validation" if name == "imagenet2012" else "test")
