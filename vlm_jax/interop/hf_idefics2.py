"""transformers Idefics2: the standalone Perceiver Resampler, and the vision front-end -> vlm_jax.

    model, variables = hf.load("perceiver-dir")   # Idefics2PerceiverResampler, model_type "idefics2_perceiver"
    out = hf.image_features(model, variables, context=x, attention_mask=m)  # [B, n_latents, D]

    model, variables = hf.load("idefics2-dir")    # Idefics2ForConditionalGeneration / Idefics2Model
    feats = hf.image_features(model, variables, pixel_values=pv, pixel_attention_mask=pam)
        # = get_image_features(pv, pam).pooler_output: a list, per sample [n_b * n_latents, d_llm]

``Idefics2Perceiver`` is our ``PerceiverResampler(variant="idefics2")``: RMSNorms,
grouped-query attention with ``num_key_value_heads`` key/value heads of
``resampler_head_dim``, SwiGLU MLP of width 4 * hidden_size, no biases; the
latents attend to concat(context, latents) and ``attention_mask`` [B, N]
(1 = token, 0 = padding; default all ones) hides padded context tokens. It
equals ``Idefics2PerceiverResampler(context, attention_mask)``.

For an ``idefics2`` directory, ``Idefics2FrontEnd`` = the Idefics2/3 vision tower
(``models/idefics_vision.IdeficsVisionTower``: Idefics2's vision transformer is
Idefics3's) + ``Idefics2Connector`` (``modality_projection``, a SwiGLU MLP from
the vision width to the language model's width with the text config's
activation, then the resampler over the tower's tokens with the padding patches
masked). As transformers does: images whose pixels are all 0 are padding frames
and dropped; a patch is real only when ALL its pixels are (Idefics3: any). Keys
are read with or without the "model." prefix (ForConditionalGeneration vs a
saved Idefics2Model); the language model's tensors are never read.

Weights: q_proj [H*Dh, D] -> attention/query/kernel [D, H, Dh]; k/v_proj
[KV*Dh, D] -> [D, KV, Dh]; o_proj [D, H*Dh] -> out/kernel [H, Dh, D]; RMSNorm
weight -> scale; gate/up/down_proj -> mlp_gate/mlp_up/mlp_down kernels (transposed).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop.hf_blip2 import _dtype, _numpy, _params, _shapes
from vlm_jax.interop.hf_idefics3 import split_frames
from vlm_jax.interop.torch_layout import (
    T, apply_rules, hf_encoder, layernorm, one, out_kernel, qkv_kernel, read_safetensors)
from vlm_jax.models import layers
from vlm_jax.models.idefics_vision import IdeficsVisionTower
from vlm_jax.models.resampler import PerceiverResampler, activation

HF_FAMILY = "hf_idefics2"

# transformers' Idefics2PerceiverConfig defaults (config.json may omit them).
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PERCEIVER_DEFAULTS = dict(hidden_act="silu", hidden_size=4096, rms_norm_eps=1e-6,
                          resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                          resampler_head_dim=96, num_key_value_heads=4)
_IGNORED = ("position_ids",)


class Idefics2Perceiver(PerceiverResampler):
    """``PerceiverResampler(variant="idefics2")`` loaded from transformers (see the module docstring)."""

    hf_family: ClassVar[str] = HF_FAMILY


class Idefics2Connector(nn.Module):
    """Idefics2's connector: SwiGLU ``modality_projection`` [B, N, Dv] -> [B, N, D], then ``resampler``.

    ``mlp_dim``: the projection's hidden width (the text config's intermediate_size);
    ``act``: its gate activation. ``mask`` [B, N] bool hides padding tokens from the
    resampler. Params: modality_projection_{gate, up, down}/kernel (("embed", "mlp") /
    ("mlp", "embed")), resampler/...
    """

    resampler: PerceiverResampler
    out_dim: int
    mlp_dim: int
    act: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask=None, train: bool = False):
        def dense(f, names, name):
            return nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            kernel_init=layers.named_init(nn.initializers.xavier_uniform(), names))

        x = jnp.asarray(tokens).astype(self.dtype)
        with_names = ("embed", "mlp")
        h = activation(self.act)(dense(self.mlp_dim, with_names, "modality_projection_gate")(x))
        h = h * dense(self.mlp_dim, with_names, "modality_projection_up")(x)
        x = dense(self.out_dim, ("mlp", "embed"), "modality_projection_down")(h)
        return self.resampler(x, mask, train=train)


class Idefics2FrontEnd(nn.Module):
    """Idefics2's image side: images [n, H, W, C] (+ patch_mask [n, H/p, W/p]) -> [n, n_latents, d_llm].

    ``tower``'s final-normed tokens, with the padding patches hidden from the
    resampler, go through ``connector``.
    """

    tower: IdeficsVisionTower
    connector: Idefics2Connector
    hf_family: ClassVar[str] = HF_FAMILY

    def __call__(self, images, patch_mask=None, train: bool = False):
        x, out = self.tower(images, patch_mask, train)
        return self.connector(x, out["patch_mask"], train)


def _resampler(pc: Mapping, cls=Idefics2Perceiver, dtype=jnp.float32) -> PerceiverResampler:
    return cls(num_latents=int(pc["resampler_n_latents"]), depth=int(pc["resampler_depth"]),
               num_heads=int(pc["resampler_n_heads"]), head_dim=int(pc["resampler_head_dim"]),
               num_kv_heads=int(pc["num_key_value_heads"]), mlp_ratio=4, out_dim=None,
               variant="idefics2", act=str(pc["hidden_act"]), norm_eps=float(pc["rms_norm_eps"]),
               dtype=dtype)


def perceiver_rules(hf: str, ours: str, r: PerceiverResampler) -> list:
    """transformers' Idefics2PerceiverResampler keys under ``hf`` <-> our resampler under ``ours``."""
    kv = r.num_kv_heads or r.num_heads
    rules = [one(f"{hf}latents", f"{ours}latents"), one(f"{hf}norm.weight", f"{ours}final_norm/scale")]
    for i in range(r.depth):
        h, o = f"{hf}layers.{i}", f"{ours}block_{i}"
        for src, dst in (("input_latents_norm", "latents_norm"), ("input_context_norm", "context_norm"),
                         ("post_attention_layernorm", "mlp_norm")):
            rules.append(one(f"{h}.{src}.weight", f"{o}/{dst}/scale"))
        a = f"{o}/attention"
        rules.append(one(f"{h}.self_attn.q_proj.weight", f"{a}/query/kernel", *qkv_kernel(r.num_heads)))
        rules.append(one(f"{h}.self_attn.k_proj.weight", f"{a}/key/kernel", *qkv_kernel(kv)))
        rules.append(one(f"{h}.self_attn.v_proj.weight", f"{a}/value/kernel", *qkv_kernel(kv)))
        rules.append(one(f"{h}.self_attn.o_proj.weight", f"{a}/out/kernel", *out_kernel(r.num_heads)))
        for p in ("gate", "up", "down"):
            rules.append(one(f"{h}.mlp.{p}_proj.weight", f"{o}/mlp_{p}/kernel", T, T))
    return rules


def load(path: str, hf_cfg: Mapping, overrides: Mapping | None = None):
    """An Idefics2PerceiverResampler ("idefics2_perceiver") directory -> (Idefics2Perceiver,
    variables); an Idefics2 ("idefics2") directory -> (Idefics2FrontEnd, variables).
    overrides: {"dtype": ...} only."""
    dtype = _dtype(overrides)
    if hf_cfg.get("model_type") == "idefics2":
        return _load_frontend(path, hf_cfg, dtype)
    pc = {**PERCEIVER_DEFAULTS, **{k: v for k, v in hf_cfg.items() if v is not None}}
    model = _resampler(pc, dtype=dtype)
    tensors = read_safetensors(path)
    d = int(pc["hidden_size"])
    expected = _shapes(model, jax.ShapeDtypeStruct((1, 1, d), jnp.float32))
    flat = apply_rules(perceiver_rules("", "", model), tensors, expected,
                       f"{path} (Idefics2PerceiverResampler)", ignored_suffixes=_IGNORED)
    return model, _params(flat)


def _load_frontend(path: str, hf_cfg: Mapping, dtype):
    from vlm_jax.interop.hf import _act, _square

    vc = {**VISION_DEFAULTS, **{k: v for k, v in (hf_cfg.get("vision_config") or {}).items()
                                if v is not None}}
    pc = {**PERCEIVER_DEFAULTS, **{k: v for k, v in (hf_cfg.get("perceiver_config") or {}).items()
                                  if v is not None}}
    parts = ("vision_model.", "connector.")
    tensors = read_safetensors(path, keep=lambda k: k.startswith(parts)
                               or k.startswith(tuple("model." + p for p in parts)))
    prefixes = {"model." if k.startswith("model.") else "" for k in tensors}
    if len(prefixes) > 1:
        raise ValueError(f"{path}: vision tensors both with and without the 'model.' prefix")
    tensors = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}
    m = "connector.modality_projection"
    if f"{m}.gate_proj.weight" not in tensors or f"{m}.down_proj.weight" not in tensors:
        raise ValueError(f"{path}: no {m} weights; not an Idefics2 checkpoint")
    mlp_dim = int(tensors[f"{m}.gate_proj.weight"].shape[0])
    out_dim = int(tensors[f"{m}.down_proj.weight"].shape[0])
    act = str((hf_cfg.get("text_config") or {}).get("hidden_act") or "silu")
    patch = _square(vc["patch_size"], "vision_config.patch_size")
    tower = IdeficsVisionTower(
        width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
        mlp_dim=int(vc["intermediate_size"]), num_heads=int(vc["num_attention_heads"]),
        patch_size=patch, image_size=_square(vc["image_size"], "vision_config.image_size"),
        act=_act(vc["hidden_act"], "vision_config.hidden_act"), ln_eps=float(vc["layer_norm_eps"]),
        dtype=dtype)
    connector = Idefics2Connector(resampler=_resampler(pc, cls=PerceiverResampler, dtype=dtype),
                                  out_dim=out_dim, mlp_dim=mlp_dim, act=act, dtype=dtype)
    model = Idefics2FrontEnd(tower=tower, connector=connector)
    v = "vision_model"
    rules = [
        one(f"{v}.embeddings.patch_embedding.weight", "tower/embedding/kernel",
            lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
        one(f"{v}.embeddings.patch_embedding.bias", "tower/embedding/bias"),
        one(f"{v}.embeddings.position_embedding.weight", "tower/pos_embedding"),
        *hf_encoder(f"{v}.encoder", "tower/Transformer", tower.depth, tower.num_heads),
        *layernorm(f"{v}.post_layernorm", "tower/Transformer/encoder_norm"),
        *[one(f"{m}.{p}_proj.weight", f"connector/modality_projection_{p}/kernel", T, T)
          for p in ("gate", "up", "down")],
        *perceiver_rules("connector.perceiver_resampler.", "connector/resampler/",
                         connector.resampler),
    ]
    channels = int(vc.get("num_channels") or 3)
    expected = _shapes(model, jax.ShapeDtypeStruct((1, patch, patch, channels), jnp.float32))
    flat = apply_rules(rules, tensors, expected, f"{path} (Idefics2 vision side)",
                       ignored_suffixes=_IGNORED)
    return model, _params(flat)


def prepare_images(patch_size: int, pixel_values, pixel_attention_mask=None):
    """Idefics2 processor outputs -> (images [n, H, W, C], patch_mask [n, H/p, W/p], counts [B]).

    As ``hf_idefics3.split_frames``, except that a patch is real when all its
    pixels are (Idefics2's rule).
    """
    return split_frames(patch_size, pixel_values, pixel_attention_mask, "all")


@functools.lru_cache(maxsize=16)
def _fn(model: nn.Module):
    return jax.jit(lambda params, x, mask: model.apply({"params": params}, x, mask))


def image_features(model, variables: Mapping, context=None, attention_mask=None, *,
                   pixel_values=None, pixel_attention_mask=None, **unexpected):
    """Idefics2Perceiver: context [B, N, D], attention_mask [B, N] (1 = token; default all)
    -> [B, n_latents, D] float32 numpy.

    Idefics2FrontEnd: pixel_values [B, N_images, C, H, W], pixel_attention_mask
    [B, N_images, H, W] (optional) -> a list with one float32 array per sample,
    [n_b * n_latents, d_llm] (its n_b real images in order), as transformers'
    ``get_image_features(...).pooler_output``.
    """
    if unexpected:
        raise ValueError(f"unexpected inputs {sorted(unexpected)} for {type(model).__name__}")
    params = variables["params"] if "params" in variables else variables
    if isinstance(model, Idefics2FrontEnd):
        if pixel_values is None or context is not None or attention_mask is not None:
            raise ValueError("an Idefics2 front-end takes pixel_values [B, N_images, C, H, W] and "
                             "optionally pixel_attention_mask [B, N_images, H, W]")
        images, pmask, counts = prepare_images(model.tower.patch_size, pixel_values,
                                               pixel_attention_mask)
        d = model.connector.out_dim
        if images.shape[0] == 0:
            return [np.zeros((0, d), np.float32) for _ in counts]
        feats = np.asarray(_fn(model)(params, images, pmask), np.float32)
        return [f.reshape(-1, d) for f in np.split(feats, np.cumsum(counts)[:-1])]
    if not isinstance(model, Idefics2Perceiver):
        raise ValueError(f"expected a model from hf_idefics2.load, got {type(model).__name__}")
    if context is None or pixel_values is not None:
        raise ValueError("an Idefics2 perceiver takes context [B, N, D] (and attention_mask)")
    x = _numpy(context).astype(np.float32)
    if x.ndim != 3:
        raise ValueError(f"context must be [B, N, D], got shape {x.shape}")
    mask = np.ones(x.shape[:2], bool)
    if attention_mask is not None:
        mask = _numpy(attention_mask)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask must be {list(x.shape[:2])}, got {list(mask.shape)}")
        mask = mask.astype(bool)
    return np.asarray(_fn(model)(params, x, mask), np.float32)
