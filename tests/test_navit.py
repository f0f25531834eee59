"""NaViT / NaFlex towers: packed images do not see each other, padding is ignored,
NaFlex position embeddings resize like transformers' Siglip2."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import models
from vlm_jax.data import packing
from vlm_jax.models import layers, navit

P, L, M = 8, 48, 4


def _config(**image):
    img = dict(type="navit", variant=None, width=32, depth=1, mlp_dim=64, num_heads=2,
               patch_size=P, image_size=32, seq_len=L, max_images=M, posemb_size=8)
    img.update(image)
    return dict(image=img, text=dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2,
                                     vocab_size=258, max_len=8), out_dim=32)


def _init(**image):
    return _init_cached(tuple(sorted(image.items())))


@functools.lru_cache(maxsize=None)
def _init_cached(image):
    model = models.build(_config(**dict(image)))
    v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32))
    return model, nn.meta.unbox(v)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(37, 53), (20, 9), (31, 31), (13, 77), (40, 17), (9, 9)]   # odd, not patch multiples
    return [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]


@functools.lru_cache(maxsize=None)
def _encoder(model):
    return jax.jit(lambda v, batch: model.apply(v, batch, method="encode_image"))


def _by_input(batch, z):
    """Packed output [S, M, D] -> {input index: embedding}."""
    idx = batch["image_index"]
    return {int(idx[s, m]): np.asarray(z[s, m]) for s, m in zip(*np.nonzero(idx >= 0))}


VARIANTS = [dict(), dict(posemb="sincos", posemb_coords="fractional"),
            dict(posemb_coords="fractional", pool_type="gap"), dict(type="naflex")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())) or "learn")
def test_packed_image_embeds_as_it_does_alone(variant):
    model, v = _init(**variant)
    images = _images()
    max_images = 1 if variant.get("type") == "naflex" else M
    batch = packing.pack(images, patch_size=P, seq_len=L, max_images=max_images)
    assert batch["segment_ids"].shape[0] < len(images) or max_images == 1
    enc = _encoder(model)
    packed = _by_input(batch, enc(v, batch))
    for i, im in enumerate(images):
        alone = packing.pack([im], patch_size=P, seq_len=L, max_images=max_images)
        z = np.asarray(enc(v, alone))[0, 0]
        np.testing.assert_allclose(packed[i], z, rtol=0, atol=1e-4 * np.abs(z).max())


def test_changing_one_image_leaves_the_others_unchanged():
    model, v = _init()
    images = _images()
    batch = packing.pack(images, patch_size=P, seq_len=L, max_images=M)
    enc = _encoder(model)
    before = _by_input(batch, enc(v, batch))
    seg = batch["segment_ids"] == 1 + np.argwhere(batch["image_index"][0] >= 0)[0, 0]
    changed_idx = int(batch["image_index"][0, 0])
    batch2 = dict(batch, patches=batch["patches"].copy())
    batch2["patches"][0][seg[0]] += 3.0
    after = _by_input(batch2, enc(v, batch2))
    assert not np.allclose(before[changed_idx], after[changed_idx])
    for i in before:
        if i != changed_idx:
            np.testing.assert_array_equal(before[i], after[i])


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_pooling_ignores_padding_tokens(pool):
    model, v = _init(pool_type=pool)
    batch = packing.pack(_images()[:2], patch_size=P, seq_len=L, max_images=M)
    pad = batch["segment_ids"] == 0
    assert pad.any()
    noisy = dict(batch, patches=batch["patches"].copy(), positions=batch["positions"].copy())
    noisy["patches"][pad] = 100.0
    noisy["positions"][pad] = 5
    enc = _encoder(model)
    np.testing.assert_allclose(enc(v, batch), enc(v, noisy), atol=1e-6)
    # Empty slots are zero and marked invalid.
    z, _, out = jax.jit(model.apply)(v, batch, jnp.zeros((batch["image_index"].size, 8), jnp.int32))
    valid = np.asarray(out["img/valid"])
    assert valid.sum() == 2 and np.array_equal(valid, batch["image_index"].reshape(-1) >= 0)
    assert np.all(np.asarray(out["img/features"])[~valid] == 0)


def test_image_array_input_equals_the_packed_image():
    model, v = _init()
    img = np.random.default_rng(1).normal(size=(2, 32, 24, 3)).astype(np.float32)
    enc = _encoder(model)
    z_arr = enc(v, img)
    batch = packing.pack(list(img), patch_size=P, seq_len=L, max_images=1)
    z_packed = enc(v, batch)[:, 0]
    assert z_arr.shape == (2, 32)
    np.testing.assert_allclose(z_arr, z_packed, atol=1e-5)


def test_uint8_packed_patches_embed_exactly_as_float32_ones():
    """The pipeline's uint8 packing: the model casts the pixels exactly, so a uint8
    pack embeds bit for bit as the float32 pack of the same images."""
    model, v = _init()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 53), (20, 9), (9, 70)]]
    u8 = packing.pack(images, patch_size=P, seq_len=L, max_images=M, dtype=np.uint8)
    f32 = packing.pack(images, patch_size=P, seq_len=L, max_images=M)
    z8, z32 = _encoder(model)(v, u8), _encoder(model)(v, f32)
    assert np.abs(np.asarray(z32)).max() > 0
    np.testing.assert_array_equal(np.asarray(z8), np.asarray(z32))


def test_jax_nn_xla_attention_equals_the_reference():
    model, v = _init()
    fast = models.build(_config(attention="xla"))
    batch = packing.pack(_images(), patch_size=P, seq_len=L, max_images=M)
    a = _encoder(model)(v, batch)
    b = _encoder(fast)(v, batch)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_vit_and_text_towers_take_the_jax_nn_attention_backends():
    """model.image.attention / model.text.attention also apply to ViT and text towers
    (unmasked image blocks and MAP head, causal-masked text): embeddings and gradients
    equal the reference (the cuDNN kernel is checked on a GPU by
    experiments/attention_check.py)."""
    def cfg(kind):
        c = _config(type="vit", attention=kind, pool_type="map")
        c["text"].update(attention=kind, causal=True)
        return c

    ref = models.build(cfg("reference"))
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 258, (2, 8)), jnp.int32)
    v = nn.meta.unbox(jax.jit(ref.init)(jax.random.key(0), images, tokens))

    def run(model):
        def loss(v):
            zi, zt = model.apply(v, images, method="encode_image"), model.apply(
                v, tokens, method="encode_text")
            return jnp.sum(zi * zt), (zi, zt)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v)

    (l0, (zi0, zt0)), g0 = run(ref)
    model = models.build(cfg("xla"))
    assert model.image.attention_fn is not None and model.text.attention_fn is not None
    (l1, (zi1, zt1)), g1 = run(model)
    np.testing.assert_allclose(zi1, zi0, atol=2e-5)
    np.testing.assert_allclose(zt1, zt0, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-5)
    with pytest.raises(ValueError, match="model.text.attention.*not one of"):
        models.build(dict(cfg("reference"), text=dict(cfg("reference")["text"], attention="flash")))


def test_cudnn_attention_off_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        models.build(_config(attention="cudnn"))
    assert models.build(_config(attention="auto")).image.attention == "auto"


def test_absolute_sincos_on_a_full_grid_is_vits_sincos2d():
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
    ours = navit.sincos_factorized(jnp.asarray(rows.reshape(-1)), jnp.asarray(cols.reshape(-1)), 16)
    np.testing.assert_allclose(ours, layers.posemb_sincos_2d(3, 5, 16)[0], atol=1e-6)


@pytest.mark.parametrize("size", [(5, 11), (16, 16), (3, 2), (7, 24)])
def test_naflex_posemb_resize_matches_jax_resize_and_torch_antialias_bilinear(size):
    g, d = 16, 6
    grid = jax.random.normal(jax.random.key(0), (g, g, d))
    h, w = size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos = jnp.asarray(np.stack([rows, cols], -1).reshape(-1, 2))
    ours = navit.resize_posemb_grid(grid, pos, jnp.broadcast_to(jnp.asarray(size), pos.shape))
    assert ours.shape == (h * w, d)
    ref = jax.image.resize(grid, (h, w, d), "bilinear", antialias=True).reshape(h * w, d)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(grid)).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
        align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(h * w, d).numpy()
    np.testing.assert_allclose(ours, t, atol=1e-5)


def test_naflex_posemb_matches_transformers_siglip2_embeddings():
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    g, d = 4, 8
    table = np.random.default_rng(0).normal(size=(g * g, d)).astype(np.float32)
    shapes = torch.tensor([[3, 5], [6, 2]])
    ref = Siglip2VisionEmbeddings.resize_positional_embeddings(
        torch.from_numpy(table).reshape(g, g, d), shapes, max_length=15).numpy()
    for b, (h, w) in enumerate(shapes.tolist()):
        batch = packing.pack_items([{"patches": np.zeros((h * w, 3)), "grid": np.array([h, w]),
                                     "positions": packing.grid_positions((h, w))}],
                                   seq_len=15, max_images=1)
        tok_sizes = batch["grid_sizes"][0, 0][None].repeat(15, 0)
        ours = navit.resize_posemb_grid(jnp.asarray(table).reshape(g, g, d),
                                        jnp.asarray(batch["positions"][0]), jnp.asarray(tok_sizes))
        np.testing.assert_allclose(np.asarray(ours)[:h * w], ref[b, :h * w], atol=1e-5)


def test_navit_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.image.type"):
        models.build(_config(type="swin"))
    with pytest.raises(ValueError, match="posemb"):
        models.build(_config(posemb="rope"))
    with pytest.raises(ValueError, match="grid_sizes"):
        model, v = _init(posemb_coords="fractional")
        batch = packing.pack(_images()[:1], patch_size=P, seq_len=L, max_images=M)
        model.apply(v, {k: batch[k] for k in ("patches", "segment_ids", "positions")},
                    method="encode_image")
