"""Scan over layers (models/scan.py): the scanned and unrolled encoders compute the same
outputs and gradients once their params are converted with ``to_scanned`` /
``to_unrolled``; remat policies keep the gradients; checkpoints, finetune inits and
interop accept either layout."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from recipes import get_config, override
from vlm_jax import checkpoint, explain, finetune, models
from vlm_jax.interop import big_vision, flatten, hf
from vlm_jax.models import navit, scan

TOL = dict(rtol=1e-5, atol=1e-5)


def _model_cfg(scan_layers=False, **image):
  img = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8,
             image_size=16, pool_type="gap", scan=scan_layers)
  img.update(image)
  return ml_collections.ConfigDict(dict(
      image=img, out_dim=32,
      text=dict(variant=None, width=24, depth=2, mlp_dim=48, num_heads=2, vocab_size=50,
                max_len=8, causal=True, scan=scan_layers)))


def _random_params(model, cfg, seed=0, boxed=None):
  """Random numpy params of ``model`` (or of its ``boxed`` abstract variables)."""
  if boxed is None:
    abstract = models.abstract_variables(model, ml_collections.ConfigDict({"model": cfg}))
  else:
    abstract = nn.meta.unbox(boxed)
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda a: rs.normal(0, 0.3, a.shape).astype(a.dtype), abstract["params"])


def _assert_trees_close(a, b, **tol):
  fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], err_msg=k, **(tol or TOL))


def _assert_trees_equal(a, b):
  fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _image_grad_fn(model):
  """jit(img params, other params, images, tokens) -> ((loss, aux), d loss / d img params).

  The loss takes every output (both embeddings, a middle block, the logit scale); aux
  holds the embeddings and the attention weights the blocks sow. Gradients w.r.t. the
  image tower only: the text tower runs forward (half the compile time of all grads).
  """
  def loss(img, rest, images, tokens):
    (zimg, ztxt, out), state = model.apply({"params": {**rest, "img": img}}, images, tokens,
                                           mutable=["intermediates"])
    w = jnp.arange(zimg.size, dtype=jnp.float32).reshape(zimg.shape) / zimg.size
    value = (jnp.sum(w * zimg) + jnp.sum(jnp.sin(ztxt)) + jnp.sum(out["img/encoder/block00"] ** 2)
             + jnp.sum(out["txt/encoder/block00"]) + out["t"].sum())
    return value, (zimg, ztxt, state["intermediates"])
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def two_tower():
  cfg_u, cfg_s = _model_cfg(False), _model_cfg(True)
  mu, ms = models.build(cfg_u), models.build(cfg_s)
  rs = np.random.RandomState(1)
  # Image 0 is what explain.attention_maps makes of ``picture``.
  picture = rs.randint(0, 255, (20, 24, 3)).astype(np.uint8)
  images = np.concatenate([explain.preprocess_image(mu.image, picture),
                           rs.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)])
  tokens = rs.randint(1, 50, (2, 8)).astype(np.int32)
  boxed = jax.eval_shape(functools.partial(ms.init, train=False), jax.random.key(0),
                         *models.dummy_inputs(cfg_s))  # the scanned model's, logically named
  return dict(cfg_u=cfg_u, cfg_s=cfg_s, mu=mu, ms=ms, pu=_random_params(mu, cfg_u, 0),
              ps=_random_params(ms, cfg_s, 1, boxed), specs=nn.get_partition_spec(boxed),
              images=images, tokens=tokens, picture=picture)


def test_two_tower_scanned_with_a_remat_policy_equals_unrolled_both_ways_and_attention_maps(
    two_tower):
  t = two_tower
  pu, ps = t["pu"], t["ps"]
  # Layouts: stacked [depth, ...] under "encoderblock" with a leading "layers" logical axis.
  conv = scan.to_scanned(pu)
  blk = conv["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert blk.shape == (2, 32, 64) and "encoderblock_0" not in conv["img"]["Transformer"]
  assert jax.tree.structure(conv) == jax.tree.structure(ps)
  specs = t["specs"]
  assert specs["params"]["txt"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"][
      "kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  _assert_trees_equal(scan.to_unrolled(conv), pu)  # lossless both ways
  _assert_trees_equal(scan.to_scanned(scan.to_unrolled(ps)), ps)

  # unrolled params -> scanned model, and scanned params -> unrolled model: same loss,
  # embeddings, attention weights and gradients. The scanned image tower also
  # rematerialises under a policy: that changes what the backward pass recomputes, not
  # the result.
  cfg = _model_cfg(True, remat_policy="dots_with_no_batch_dims_saveable")
  fu, fs = _image_grad_fn(t["mu"]), _image_grad_fn(models.build(cfg))
  args = (t["images"], t["tokens"])
  for p_unrolled, p_scanned in ((scan.to_unrolled(ps), ps), (pu, conv)):
    (lu, aux_u), gu = fu(p_unrolled["img"], p_unrolled, *args)
    (ls, aux_s), gs = fs(p_scanned["img"], p_scanned, *args)
    np.testing.assert_allclose(float(ls), float(lu), rtol=1e-5)
    np.testing.assert_allclose(aux_s[0], aux_u[0], **TOL)  # image embeddings
    np.testing.assert_allclose(aux_s[1], aux_u[1], **TOL)  # text embeddings (causal)
    assert "encoderblock" in aux_s[2]["txt"]["Transformer"]  # sown [depth, ...] under scan
    _assert_trees_close(scan.to_unrolled(jax.device_get(aux_s[2])), aux_u[2])
    _assert_trees_close(scan.to_unrolled(jax.device_get(gs)), gu, rtol=1e-4, atol=1e-5)

  # explain.attention_maps of the scanned tower: the unrolled tower's per-layer weights.
  maps = explain.attention_maps(t["ms"], {"params": conv}, t["picture"])
  blocks = aux_u[2]["img"]["Transformer"]
  want = np.stack([blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"][
      "attention_weights"][0][0] for i in range(2)])
  assert maps["attention"].shape == (2, 4, 4, 4)
  np.testing.assert_allclose(maps["attention"], want, **TOL)


def test_navit_scanned_equals_unrolled_on_a_packed_batch():
  kw = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, max_images=2,
            pool_type="gap")
  mu, ms = navit.NaViT(**kw), navit.NaViT(**kw, scan=True)
  rs = np.random.RandomState(3)
  seg = np.array([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2]], np.int32)
  batch = {"patches": rs.normal(size=(2, 8, 48)).astype(np.float32), "segment_ids": seg,
           "positions": rs.randint(0, 3, (2, 8, 2)).astype(np.int32),
           "grid_sizes": np.array([[[2, 2], [1, 2]], [[2, 3], [1, 2]]], np.int32)}
  pu = jax.tree.map(lambda a: rs.normal(0, 0.3, a.shape).astype(np.float32),
                    nn.meta.unbox(jax.eval_shape(mu.init, jax.random.key(0), batch)["params"]))

  def run(model, params):
    x, out = jax.jit(model.apply)({"params": params}, batch)
    return np.asarray(x), np.asarray(out["encoder/block00"])
  for got, want in zip(run(ms, scan.to_scanned(pu)), run(mu, pu)):
    np.testing.assert_allclose(got, want, **TOL)


def test_checkpoints_finetune_init_and_interop_take_either_layout(two_tower, tmp_path):
  t = two_tower
  pu, conv = t["pu"], scan.to_scanned(t["pu"])
  # A run saved unrolled (step 3), then a checkpoint stored scanned under the same config.
  c = get_config("siglip_shapes", "runlocal")
  c.model = t["cfg_u"]
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  ck = checkpoint.Checkpointer(wd, async_save=False)
  ck.save(3, {"step": np.int32(3), "params": pu}, {})
  ck.save(4, {"step": np.int32(4), "params": conv}, {})
  ck.close()
  loaded = checkpoint.load(wd, step=3, scan=True)  # unrolled on disk -> a scanned model
  assert loaded.model.image.scan and loaded.model.text.scan
  _assert_trees_equal(loaded.params, conv)
  # finetune.load_init of step 4 into a scanned model: checkpoint.load converts the stored
  # stacks to the run's unrolled model, load_init back to the target's layout.
  ft = override(get_config("siglip_shapes", "runlocal"), {"init.workdir": wd, "init.step": 4})
  ft.model = t["cfg_s"]
  fresh = jax.tree.map(np.zeros_like, t["ps"])
  got, _, report = finetune.load_init(ft, fresh, {})
  assert not report.fresh and not report.unused
  _assert_trees_equal(got, conv)

  # transformers export from a scanned (SigLIP-shaped: MAP-pooled) model; import into
  # either layout.
  cfg = _model_cfg(True, pool_type="map")
  cfg.text.causal = False
  model = models.build(cfg)
  p_map = _random_params(model, cfg, 2)
  path = hf.save(model, {"params": p_map}, str(tmp_path / "hf"))
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["vision_config"]["num_hidden_layers"] == 2
  m2, v2 = hf.load(path, overrides={"image": {"scan": True}, "text": {"scan": True}})
  assert m2.image.scan and m2.text.scan
  _assert_trees_equal(v2["params"], p_map)
  # big_vision npz (unrolled keys here) into a scanned model.
  np.savez(tmp_path / "bv.npz", **{k.replace("txt/Transformer/", "txt/Encoder_0/"): np.asarray(v)
                                   for k, v in flatten(pu).items()})
  _, v3 = big_vision.load_npz(str(tmp_path / "bv.npz"),
                              {"image": {"scan": True}, "text": {"scan": True}})
  _assert_trees_equal(v3["params"], conv)


def test_bad_scan_and_remat_settings_name_the_field():
  with pytest.raises(ValueError, match="model.image.remat_policy='dots'"):
    models.resolve_config(_model_cfg(remat_policy="dots"))
  with pytest.raises(ValueError, match="remat=True contradicts"):
    models.resolve_config(_model_cfg(remat=True, remat_policy="none"))
  with pytest.raises(ValueError, match="scan=True cannot run Token Merging"):
    models.resolve_config(_model_cfg(True, tome_r=2))
  c = override(get_config("siglip_shapes", "runlocal"), {"finetune.lora.rank": 2})
  c.model.text.scan = True
  with pytest.raises(ValueError, match="model.text.scan to False"):
    finetune.check_config(c)
  with pytest.raises(ValueError, match="not numbered 0..n-1"):
    scan.to_scanned({"encoderblock_0": {"w": np.zeros(2)}, "encoderblock_2": {"w": np.zeros(2)}})
