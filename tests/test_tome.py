"""Token Merging (vlm_jax/models/tome.py) inside the ViT."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models, parallel
from vlm_jax.models import layers, tome, vit

# Odd sizes: width 40 with 5 heads (head dim 8), a 6 x 5 token grid (30 tokens).
_KW = dict(width=40, depth=3, mlp_dim=56, num_heads=5, patch_size=4, image_size=(24, 20))


@pytest.fixture(scope="module")
def image():
  return jax.random.normal(jax.random.key(1), (2, 24, 20, 3))


@pytest.fixture(scope="module")
def variables(image):
  """Parameters of the plain (tome_r=0) ViT with a MAP head and a projection, plus a
  CLS token (for pool "tok"; unused otherwise)."""
  model = vit.ViT(**_KW, pool_type="map", head=7)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), image))
  shapes["params"]["cls"] = jax.ShapeDtypeStruct((1, 1, 40), jnp.float32)
  rng = np.random.default_rng(0)
  # Random values without compiling the initialisers: LayerNorm scales near 1.
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(
          (path[-1].key == "scale") + 0.15 * rng.standard_normal(a.shape), jnp.float32),
      shapes)


@functools.lru_cache(maxsize=None)
def _jitted(model, **kw):
  return jax.jit(functools.partial(model.apply, **kw))


def _apply(model, variables, *args, **kw):
  return _jitted(model, **kw)(variables, *args)


def test_tome_r_0_is_the_plain_vit_and_tome_keeps_its_parameter_tree(image, variables):
  plain = vit.ViT(**_KW, pool_type="map", head=7)
  # The same parameters, shapes and logical axis names with or without merging.
  trees = [jax.eval_shape(m.init, jax.random.key(0), image)
           for m in (plain, plain.clone(tome_r=(3, 0, 5)))]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), trees[0]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), trees[1])
  assert nn.get_partition_spec(trees[0]) == nn.get_partition_spec(trees[1])
  # tome_r=0 runs the plain encoder: no token sizes, all tokens.
  _, out0 = jax.eval_shape(plain.clone(tome_r=0).apply, variables, image)
  assert "token_sizes" not in out0 and out0["tokens"].shape == (2, 30, 40)
  # The ToMe blocks with nothing to merge compute exactly the plain blocks.
  x = jax.random.normal(jax.random.key(2), (2, 30, 40))
  enc_vars = {"params": variables["params"]["Transformer"]}
  a, a_out = _apply(layers.Encoder(depth=3, mlp_dim=56, num_heads=5), enc_vars, x)
  b, b_out, sizes = _apply(tome.ToMeEncoder(depth=3, mlp_dim=56, num_heads=5, r=(0, 0, 0)),
                           enc_vars, x)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a_out["block01"], b_out["block01"])
  np.testing.assert_array_equal(sizes, np.ones((2, 30)))


@pytest.mark.parametrize("pool,schedule,counts", [
    ("gap", (4, 3, 5), [26, 23, 18]),
    ("map", 20, [15, 8, 4]),          # capped at half the tokens per block
    ("tok", 20, [16, 9, 5]),          # 31 tokens, the CLS never merged
])
def test_token_counts_per_block_and_sizes_summing_to_the_patches(image, variables, pool,
                                                                 schedule, counts):
  model = vit.ViT(**_KW, pool_type=pool, head=7, tome_r=schedule)
  n = 31 if pool == "tok" else 30
  assert tome.token_counts(n, tome.parse_r(schedule, 3), pool == "tok") == counts
  y, out = _apply(model, variables, image)
  assert y.shape == (2, 7) and np.all(np.isfinite(y))
  assert [out[f"encoder/block{i:02d}"].shape[1] for i in range(3)] == counts
  assert out["tokens"].shape == (2, counts[-1], 40)
  sizes = np.asarray(out["token_sizes"])
  assert sizes.shape == (2, counts[-1]) and sizes.min() >= 1
  np.testing.assert_allclose(sizes.sum(axis=1), n)
  if pool == "tok":
    np.testing.assert_array_equal(sizes[:, 0], 1.0)  # the CLS stayed alone and first
    assert out["encoded"].shape == (2, counts[-1] - 1, 40)


def test_merging_duplicate_tokens_with_proportional_attention_changes_nothing(variables):
  """Pairs of identical tokens merged into one of size 2 (log 2 added to its logits)
  give every remaining token the block output of the unmerged sequence."""
  u = np.array(jax.random.normal(jax.random.key(3), (2, 12, 40)))
  for a in (2, 6, 10):
    u[:, a] = u[:, a + 1]        # A token a duplicates its B neighbour a + 1
  u[:, 0] = u[:, 1]              # ... and so does token 0, which is protected
  x = jnp.asarray(u)
  block_vars = {"params": variables["params"]["Transformer"]["encoderblock_0"]}
  plain = _apply(layers.Encoder1DBlock(mlp_dim=56, num_heads=5), block_vars, x)
  block = tome.ToMeBlock(mlp_dim=56, num_heads=5, r=3, protect_first=True)
  merged, sizes = jax.jit(block.apply)(block_vars, x, jnp.ones((2, 12)))
  # Unmerged A tokens in order (0, 4, 8), then all B tokens (1, 3, ..., 11).
  keep = [0, 4, 8, 1, 3, 5, 7, 9, 11]
  np.testing.assert_array_equal(sizes, np.tile([1, 1, 1, 1, 2, 1, 2, 1, 2], (2, 1)))
  # (Without the log(2) bias each merged token would get half its unmerged weight.)
  err = np.abs(np.asarray(merged) - np.asarray(plain)[:, keep]).max()
  assert err <= 1e-5 * np.abs(np.asarray(plain)).max(), err


def test_the_protected_first_token_is_never_merged():
  x = jax.random.normal(jax.random.key(4), (1, 9, 6))
  x = x.at[:, 0].set(x[:, 1])    # token 0's best match is exact
  kept, merged = jax.jit(lambda x: [tome.bipartite_soft_matching(x, 1, p)(x)
                                    for p in (True, False)])(x)
  np.testing.assert_array_equal(kept[:, 0], x[:, 0])
  assert kept.shape == (1, 8, 6)
  np.testing.assert_allclose(merged[:, 4], 2 * x[:, 1])   # summed into B token 1
  assert not np.any(np.all(np.isclose(merged, x[:, :1]), axis=-1))


def test_tome_trains_under_jit_grad_and_remat_on_a_mesh(image, variables):
  model = vit.ViT(**dict(_KW, depth=1), pool_type="map", head=7, tome_r=20, remat=True)
  params = {k: v for k, v in variables["params"].items() if k != "Transformer"}
  params["Transformer"] = {k: v for k, v in variables["params"]["Transformer"].items()
                           if k in ("encoderblock_0", "encoder_norm")}
  mesh = parallel.make_mesh([("data", 2)], devices=jax.devices()[:2])

  def loss(params):
    y, out = model.apply({"params": params}, image)
    return jnp.sum(y ** 2) + jnp.sum(out["token_sizes"]), y

  # As in training: the batch split over a mesh (the logical constraints stay no-ops
  # without axis rules, as everywhere in vlm_jax).
  image = jax.device_put(image, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data")))
  (value, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert y.shape == (2, 7)
  np.testing.assert_allclose(value, jnp.sum(y ** 2) + 60.0, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if path[0].key != "cls":                                   # unused by pool "map"
      assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0, path


def test_config_field_and_errors(image, variables):
  cfg = dict(image=dict(variant=None, width=40, depth=3, mlp_dim=56, num_heads=5, patch_size=4,
                        image_size=24, tome_r=(2, 2, 0)),
             text=dict(variant=None, width=40, depth=1, mlp_dim=8, num_heads=1, vocab_size=11))
  assert models.build(cfg).image.tome_r == (2, 2, 0)
  assert models.build({**cfg, "image": {**cfg["image"], "tome_r": 0}}).image.tome_r == 0
  for bad in (-1, 1.5, (1, -2)):
    with pytest.raises(ValueError, match="tome_r"):
      models.build({**cfg, "image": {**cfg["image"], "tome_r": bad}})
  with pytest.raises(ValueError, match="Token Merging needs"):
    models.build({**cfg, "image": {**cfg["image"], "type": "navit"}})
  model = vit.ViT(**_KW, pool_type="map", head=7)
  with pytest.raises(ValueError, match="depth 3"):
    model.clone(tome_r=(1, 2)).apply(variables, image)
  with pytest.raises(ValueError, match="attention maps"):
    model.clone(tome_r=1).apply(variables, image, mutable=["intermediates"])

  def no_bias_hook(query, key, value, mask=None):
    return layers.dot_product_attention_f32(query, key, value, mask=mask)
  with pytest.raises(ValueError, match="bias"):
    model.clone(tome_r=1, attention_fn=no_bias_hook).apply(variables, image)


def test_schedules_halve_the_tokens():
  r = tome.constant_r_for(197, 12, 0.5, protect_first=True)
  assert tome.token_counts(197, (r,) * 12, True)[-1] <= 98 < tome.token_counts(
      197, (r - 1,) * 12, True)[-1]
  sched = tome.decreasing_schedule(197, 12, 0.5, protect_first=True)
  assert len(sched) == 12 and sched[-1] == 0 and list(sched) == sorted(sched, reverse=True)
  assert tome.token_counts(197, sched, True)[-1] == 197 - 99
