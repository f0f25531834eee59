"""vlm_jax.explain: attention maps, rollout, patch-text similarity and overlays."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax import explain, inference
from vlm_jax.models import layers
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.two_tower import TwoTower
from vlm_jax.models.vit import ViT

# A 16 x 32 image in 8-pixel patches: a 2 x 4 grid, so a transposed map would show.
VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8, image_size=(16, 32))
GRID = (2, 4)
N = GRID[0] * GRID[1]


def _image(h=16, w=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _init(module, *inputs, seed=0):
  """Variables of ``module.init``'s shapes filled from numpy: eager init is slow on CPU."""
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda a: jnp.asarray(rs.normal(0, 0.3, a.shape), a.dtype), abstract)


def _onehot(i, n=N):
  e = np.zeros(n)
  e[i] = 1.0
  return e


def _forced_attention(targets):
  """attention_fn whose probabilities are one-hot on ``targets[layer name]`` (one key per
  head), sown like the reference attention's."""
  def fn(query, key, value, mask=None, dtype=None, module=None):
    where = [p for p in module.scope.path if p.startswith(("encoderblock_", "MAPHead_"))][0]
    probs = jax.nn.one_hot(jnp.asarray(targets[where]), key.shape[1])      # [H, Lk]
    probs = jnp.broadcast_to(probs[None, :, None, :],
                             (query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
    module.sow("intermediates", "attention_weights", probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
  return fn


# --------------------------------------------------------------------------- rollout


def test_rollout_multiplies_layers_from_the_input_up():
  # Layer 0 sends every token to token 5, layer 1 to token 2; heads are averaged.
  p5, p2 = np.tile(_onehot(5), (N, 1)), np.tile(_onehot(2), (N, 1))
  r = explain.attention_rollout([np.stack([p5, p5]), np.stack([p2, np.eye(N)])])
  # Â0 = (P5 + I) / 2, Â1 = (P2 / 2 + I / 2 + I) / 2 = P2 / 4 + 3 I / 4, and P2 P5 = P5:
  # R = Â1 Â0 = P5 / 8 + P2 / 8 + 3 P5 / 8 + 3 I / 8 (the other order gives 3 P5 / 8 + P2 / 4 + ...)
  expected = 0.5 * p5 + 0.125 * p2 + 0.375 * np.eye(N)
  np.testing.assert_allclose(r, expected, atol=1e-12)
  np.testing.assert_allclose(r.sum(axis=1), 1.0)


def test_rollout_of_a_gap_model_with_forced_attention():
  tower = ViT(**VIT, pool_type="gap",
              attention_fn=_forced_attention({"encoderblock_0": [5, 5], "encoderblock_1": [2, 2]}))
  variables = _init(tower, jnp.zeros((1, 16, 32, 3)))
  maps = explain.attention_maps(tower, variables, _image())
  # Mean of the rows of R = Â1 Â0 = P5 / 2 + P2 / 4 + I / 4 (every token is a patch).
  expected = 0.5 * _onehot(5) + 0.25 * _onehot(2) + 0.25 / N
  np.testing.assert_allclose(maps["rollout"], expected.reshape(GRID), atol=1e-6)
  assert maps["grid"] == GRID and "map" not in maps


def test_map_probe_and_rollout_of_a_map_model_with_forced_attention():
  tower = ViT(**VIT, pool_type="map", attention_fn=_forced_attention(
      {"encoderblock_0": [5, 5], "encoderblock_1": [2, 2], "MAPHead_0": [3, 6]}))
  variables = _init(tower, jnp.zeros((1, 16, 32, 3)))
  maps = explain.attention_maps(tower, variables, _image())
  np.testing.assert_allclose(maps["map_heads"][0], _onehot(3).reshape(GRID), atol=1e-6)
  np.testing.assert_allclose(maps["map_heads"][1], _onehot(6).reshape(GRID), atol=1e-6)
  np.testing.assert_allclose(maps["map"], (0.5 * _onehot(3) + 0.5 * _onehot(6)).reshape(GRID),
                             atol=1e-6)
  # The probe (no residual) reads rows 3 and 6 of R = P5 / 2 + P2 / 4 + I / 4.
  expected = 0.5 * _onehot(5) + 0.25 * _onehot(2) + 0.125 * (_onehot(3) + _onehot(6))
  np.testing.assert_allclose(maps["rollout"], expected.reshape(GRID), atol=1e-6)


def test_cls_rollout_is_the_cls_row_of_the_sown_weights_rolled_out():
  tower = ViT(**VIT, pool_type="tok")
  variables = _init(tower, jnp.zeros((1, 16, 32, 3)))
  maps = explain.attention_maps(tower, variables, _image())
  att = maps["attention"]
  assert att.shape == (2, 2, N + 1, N + 1)
  r = np.eye(N + 1)
  for a in att:   # straight from the paper: Â = 0.5 mean_h(A) + 0.5 I, R_l = Â_l R_{l-1}
    r = (0.5 * a.mean(0) + 0.5 * np.eye(N + 1)) @ r
  cls = r[0, 1:] / r[0, 1:].sum()
  np.testing.assert_allclose(maps["rollout"], cls.reshape(GRID), rtol=1e-5)


def test_map_probe_maps_are_the_probes_softmax_and_sum_to_one_per_head():
  tower = ViT(**VIT, pool_type="map")
  variables = _init(tower, jnp.zeros((1, 16, 32, 3)))
  image = _image()
  maps = explain.attention_maps(tower, variables, image)
  heads = maps["map_heads"]
  assert heads.shape == (2, *GRID)
  np.testing.assert_allclose(heads.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(maps["rollout"].sum(), 1.0, rtol=1e-5)
  # The same probabilities from the parameters: softmax(q . k / sqrt(dh)) over the patches.
  p = variables["params"]["MAPHead_0"]
  att = p["MultiHeadDotProductAttention_0"]
  _, out, _ = explain._forward(tower)(variables, explain.preprocess_image(tower, image))  # pylint: disable=protected-access
  enc = np.asarray(out["encoded"][0])
  q = np.einsum("d,dhk->hk", np.asarray(p["probe"])[0, 0], att["query"]["kernel"]) + att["query"]["bias"]
  k = np.einsum("nd,dhk->nhk", enc, att["key"]["kernel"]) + att["key"]["bias"]
  logits = np.einsum("hk,nhk->hn", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(heads.reshape(2, N), probs, rtol=1e-4, atol=1e-6)


def test_sowing_attention_changes_no_output_and_no_parameter():
  def hook(query, key, value, mask=None, dtype=None):   # cannot sow: no ``module`` argument
    return layers.dot_product_attention_f32(query, key, value, mask=mask, dtype=dtype)

  x = jnp.asarray(_image()[None], jnp.float32) / 255.0
  sowing, plain = ViT(**VIT), ViT(**VIT, attention_fn=hook)
  assert layers.sows_attention_weights(None) and not layers.sows_attention_weights(hook)
  # The same parameters: names, shapes and logical axes.
  shapes = [jax.eval_shape(m.init, jax.random.key(0), x) for m in (sowing, plain)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])
  names = [[b.names for b in jax.tree.leaves(s, is_leaf=lambda b: hasattr(b, "names"))]
           for s in shapes]
  assert names[0] == names[1] and len(names[0]) > 10
  v1 = _init(sowing, x)
  y_plain, _ = jax.jit(plain.apply)(v1, x)
  y, _ = jax.jit(sowing.apply)(v1, x)
  (y_sown, _), state = jax.jit(functools.partial(sowing.apply, mutable=["intermediates"]))(v1, x)
  np.testing.assert_array_equal(y, y_plain)
  np.testing.assert_array_equal(y_sown, y_plain)
  inter = state["intermediates"]
  assert sorted(inter) == ["MAPHead_0", "Transformer"]
  assert sorted(inter["Transformer"]) == ["encoderblock_0", "encoderblock_1"]
  (_, _), plain_state = jax.jit(functools.partial(plain.apply, mutable=["intermediates"]))(v1, x)
  assert not plain_state.get("intermediates")


# --------------------------------------------------------------------------- similarity


@pytest.fixture(scope="module")
def two_tower():
  def build(pool_type):
    model = TwoTower(
        image=ViT(**VIT, pool_type=pool_type, head=8),
        text=TextTransformer(vocab_size=258, width=16, depth=1, mlp_dim=32, num_heads=2,
                             max_len=12, head=8))
    variables = _init(model, jnp.zeros((1, 16, 32, 3)), jnp.zeros((1, 12), jnp.int32), seed=1)
    return model, variables
  return {"gap": build("gap"), "map": build("map")}


def test_gap_patch_embeddings_average_to_the_image_embedding(two_tower):
  model, variables = two_tower["gap"]
  image = _image(20, 50)   # resized to 16 x 32 like inference does
  z = explain.patch_embeddings(model, variables, image)
  assert z.shape == (*GRID, 8)
  zimg = inference.encode_images(model, variables, [image])[0]
  np.testing.assert_allclose(z.mean(axis=(0, 1)), zimg, rtol=1e-4, atol=1e-5)
  assert np.ptp(z, axis=(0, 1)).max() > 1e-3   # the patches differ


def test_map_pooling_is_rebuilt_exactly_from_the_towers_parameters(two_tower):
  # patch_embeddings runs the MAP head and projection on one-token sequences; on all
  # tokens at once the same code must give the model's own image embedding.
  model, variables = two_tower["map"]
  image = _image(seed=3)
  tower, params = model.image, variables["params"]["img"]
  _, out, _ = explain._forward(tower)({"params": params}, explain.preprocess_image(tower, image))  # pylint: disable=protected-access
  pooled = jax.jit(explain._pool_and_project, static_argnums=0)(tower, params, out["encoded"])  # pylint: disable=protected-access
  zimg = inference.encode_images(model, variables, [image])
  np.testing.assert_allclose(pooled, zimg, rtol=1e-4, atol=1e-5)


def test_similarity_map_follows_the_patch_grid_and_the_text(two_tower):
  model, variables = two_tower["map"]
  image = _image(seed=4)
  sim = explain.similarity_map(model, variables, image, "a red circle")
  assert sim.shape == GRID and sim.dtype == np.float32
  assert np.all(np.isfinite(sim)) and np.all(np.abs(sim) <= 1.0 + 1e-6)
  ztxt = inference.encode_texts(model, variables, ["a red circle"])[0]
  np.testing.assert_allclose(explain.similarity_map(model, variables, image, ztxt), sim, atol=1e-6)
  # A text embedding equal to patch (1, 2)'s embedding lights up exactly that patch.
  z = explain.patch_embeddings(model, variables, image)
  target = explain.similarity_map(model, variables, image, z[1, 2])
  assert np.unravel_index(np.argmax(target), GRID) == (1, 2)
  np.testing.assert_allclose(target[1, 2], 1.0, rtol=1e-5)
  assert explain.explain(model, variables, image, "a red circle").shape == GRID
  np.testing.assert_array_equal(explain.explain(model, variables, image, "a red circle"), sim)
  np.testing.assert_array_equal(explain.explain(model, variables, image),
                                explain.attention_maps(model, variables, image)["map"])
  with pytest.raises(ValueError, match="method"):
    explain.explain(model, variables, image, method="gradcam")


# --------------------------------------------------------------------------- pictures


def test_overlay_writes_a_png_of_the_images_size(tmp_path):
  image = _image(37, 53, seed=5)
  heat = np.zeros(GRID, np.float32)
  heat[0, 0] = 1.0
  path = str(tmp_path / "overlay.png")
  rgb = explain.overlay(image, heat, path=path, alpha=0.6)
  assert rgb.shape == (37, 53, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
  np.testing.assert_array_equal(explain.overlay(image, heat, alpha=0.0), image)
  hot = explain.overlay(np.zeros((37, 53, 3), np.uint8), heat, alpha=1.0).astype(int).sum(-1)
  assert hot[:5, :5].mean() > hot[-5:, -5:].mean() + 200   # bright where the heat is
  ramp = explain._ramp(np.linspace(0, 1, 11)).sum(-1)   # pylint: disable=protected-access
  assert np.all(np.diff(ramp) > 0)   # the fallback colour map brightens monotonically
