"""vlm_jax.inference: any-size images and texts in, embeddings out, in input order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import inference, models
from vlm_jax.data import packing, preprocess
from vlm_jax.data.tokenizers import ByteTokenizer

TEXT = dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=258, max_len=16)


def _model(image):
    model = models.build(dict(image=image, text=TEXT, out_dim=32))
    images, tokens = models.dummy_inputs(dict(image=image, text=TEXT, out_dim=32))
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            for h, w in [(37, 53), (16, 16), (70, 12), (25, 40), (8, 90)]]


def test_navit_images_come_back_in_input_order_each_as_if_alone():
    model, v = _model(dict(type="navit", variant=None, width=32, depth=1, mlp_dim=64, num_heads=2,
                           patch_size=8, image_size=32, seq_len=32, max_images=3, posemb_size=16))
    images = _images()
    z = inference.encode_images(model, v, images, batch_size=1)
    assert z.shape == (5, 32) and z.dtype == np.float32
    enc = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    for i, im in enumerate(images):
        alone = packing.pack([im], patch_size=8, seq_len=32, max_images=3)
        alone["patches"] = alone["patches"] * (2 / 255) - 1   # value range (-1, 1)
        ref = np.asarray(enc(v, alone))[0, 0]
        np.testing.assert_allclose(z[i], ref, atol=1e-4 * np.abs(ref).max())
    zn = inference.encode_images(model, v, images, seq_len=32, max_images=2, normalize=True)
    np.testing.assert_allclose(zn, z / np.linalg.norm(z, axis=-1, keepdims=True), atol=1e-4)


def test_vit_images_are_resized_to_the_model_size():
    model, v = _model(dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                           image_size=16))
    images = _images()
    z = inference.encode_images(model, v, images, batch_size=2)
    x = np.stack([preprocess.preprocess_image(im, image_size=16) for im in images])
    ref = model.apply(v, x, method="encode_image")
    np.testing.assert_allclose(z, ref, atol=1e-4)


def test_texts_come_back_in_input_order():
    model, v = _model(dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                           image_size=16))
    texts = ["a red circle", "two blue squares", "x", "a green ring at the top"]
    z = inference.encode_texts(model, v, texts, batch_size=3)
    ref = model.apply(v, jnp.asarray(ByteTokenizer(16).encode(texts)), method="encode_text")
    np.testing.assert_allclose(z, ref, atol=1e-5)


def test_texts_need_the_runs_tokenizer_when_the_vocabulary_is_not_bytes():
    text = dict(TEXT, vocab_size=1000)
    image = dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                 image_size=16)
    model = models.build(dict(image=image, text=text, out_dim=32))
    images, tokens = models.dummy_inputs(dict(image=image, text=text, out_dim=32))
    v = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    try:
        inference.encode_texts(model, v, ["a red circle"])
    except ValueError as e:
        assert "1000" in str(e) and "tokenizer" in str(e)
    else:
        raise AssertionError("a byte tokenizer was silently used for a 1000-token vocabulary")
    z = inference.encode_texts(model, v, ["a red circle"], tokenizer=ByteTokenizer(16))
    assert z.shape == (1, 32)
