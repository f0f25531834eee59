"""transformers BLIP-2 -> vlm_jax: the vision tower + Q-Former + language projection, and the
standalone Q-Former.

    model, variables = hf.load("blip2-dir")          # Blip2ForConditionalGeneration, model_type "blip-2"
    feats = hf.image_features(model, variables, pixel_values=px)   # [B, num_query_tokens, d_llm]

    model, variables = hf.load("qformer-dir")        # Blip2QFormerModel, model_type "blip_2_qformer"
    out = hf.image_features(model, variables, query_embeds=q, encoder_hidden_states=img,
                            encoder_attention_mask=None, attention_mask=None)  # [B, Q, width]

BLIP-2 (``Blip2FrontEnd``): ``image`` is our ViT with pool "tok" (CLS token),
no pre-norm, exact GELU by default, built from ``vision_config``; its
``out["tokens"]`` (all tokens, CLS first, after ``post_layernorm``) are the
Q-Former's encoder states, as transformers' ``vision_model(...)[0]``. ``qformer``
is our ``QFormer`` with the checkpoint's ``query_tokens`` and
``language_projection`` (out_dim = the language model's width). The result
equals ``Blip2ForConditionalGeneration.get_image_features(pixel_values).pooler_output``.
The language model's tensors (``language_model.*``) are never read.

Weight layouts accepted (the same top-level names ``vision_model.``, ``query_tokens``,
``qformer.``, ``language_projection.``; transformers 5.x renames nothing here):

    vision attention  qkv.weight [3D, D] + qkv.bias [3D]        (transformers 5.x save_pretrained)
                      qkv.weight [3D, D] + q_bias [D] + v_bias [D]   (the hub's older files)
                      qkv.weight only                            (qkv_bias false: zero biases)
    class_embedding [1, 1, D] + position_embedding[:, 0] -> cls;  position_embedding[:, 1:] -> pos_embedding

The key bias of the fused qkv (zero in older files) is carried over as it is;
it shifts every logit of a query row equally, so softmax ignores it anyway.

Standalone Q-Former (``QFormerModel``, a ``QFormer`` with num_queries=0 and no
projection): the input contract mirrors ``Blip2QFormerModel.forward``:
``query_embeds`` [B or 1, Q, width] (e.g. BLIP-2's query tokens), the image
tokens as ``encoder_hidden_states`` (alias ``image_embeds``) [B, N, encoder_hidden_size],
optional ``encoder_attention_mask`` [B, N] (1 = token) and ``attention_mask``
[B, Q] (1 = query visible to self-attention); returns ``last_hidden_state``.
Only the query path is built: with ``use_qformer_text_input`` the text FFN
weights (``encoder.layer.{i}.intermediate/output``) are skipped, unread.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop import flatten, unflatten
from vlm_jax.interop.torch_layout import (
    Rule, apply_rules, layernorm, linear, one, out_kernel, qkv_bias, qkv_kernel, read_safetensors)
from vlm_jax.models.qformer import QFormer
from vlm_jax.models.vit import ViT

HF_FAMILY = "hf_blip2"

# Defaults of transformers' Blip2VisionConfig / Blip2QFormerConfig (config.json may omit them).
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                       layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12,
                        cross_attention_frequency=2, encoder_hidden_size=1408,
                        use_qformer_text_input=False)
_IGNORED = ("position_ids",)


class Blip2FrontEnd(nn.Module):
    """BLIP-2's image side: images [B, H, W, C] -> [B, num_query_tokens, d_llm].

    ``image``: ViT (pool "tok"); ``qformer``: QFormer reading ``image``'s
    out["tokens"] (final-normed, CLS included) and projecting to the LM width.
    """

    image: ViT
    qformer: QFormer
    hf_family: ClassVar[str] = HF_FAMILY

    def __call__(self, images, train: bool = False):
        _, out = self.image(images, train=train)
        return self.qformer(out["tokens"], train=train)


class QFormerModel(QFormer):
    """A ``QFormer`` loaded from a standalone Blip2QFormerModel directory (queries passed in)."""

    hf_family: ClassVar[str] = HF_FAMILY


def _sub(cfg: Mapping, key: str, defaults: Mapping) -> dict:
    given = cfg.get(key, cfg) if key else cfg
    return {**defaults, **{k: v for k, v in (given or {}).items() if v is not None}}


def _vit(vc: Mapping, dtype) -> ViT:
    from vlm_jax.interop.hf import _act, _square
    return ViT(width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
               mlp_dim=int(vc["intermediate_size"]), num_heads=int(vc["num_attention_heads"]),
               patch_size=_square(vc["patch_size"], "vision_config.patch_size"),
               image_size=_square(vc["image_size"], "vision_config.image_size"),
               pool_type="tok", posemb="learn", head=None, pre_norm=False,
               act=_act(vc["hidden_act"], "vision_config.hidden_act"),
               ln_eps=float(vc["layer_norm_eps"]), dtype=dtype)


def _qformer(qc: Mapping, cls=QFormer, **kw) -> QFormer:
    from vlm_jax.interop.hf import _act
    return cls(depth=int(qc["num_hidden_layers"]), num_heads=int(qc["num_attention_heads"]),
               mlp_dim=int(qc["intermediate_size"]),
               cross_attention_frequency=int(qc["cross_attention_frequency"]),
               encoder_width=int(qc["encoder_hidden_size"]), width=int(qc["hidden_size"]),
               act=_act(qc["hidden_act"], "qformer_config.hidden_act"),
               ln_eps=float(qc["layer_norm_eps"]), **kw)


# ---------------------------------------------------------------- rules

def _no_export(ys):
    raise NotImplementedError("BLIP-2 weights are import-only")


def _vision_attention(h: str, o: str, heads: int, tensors: Mapping) -> Rule:
    """The fused qkv Linear (+ its bias in one of two layouts) -> query / key / value."""
    fk, _ = qkv_kernel(heads)
    fb, _ = qkv_bias(heads)
    names = tuple(f"{o}/{n}/{p}" for n in ("query", "key", "value") for p in ("kernel", "bias"))
    if f"{h}.qkv.bias" in tensors:
        keys = (f"{h}.qkv.weight", f"{h}.qkv.bias")
        split = lambda xs: np.split(xs[1], 3)  # noqa: E731
    elif f"{h}.q_bias" in tensors or f"{h}.v_bias" in tensors:
        keys = (f"{h}.qkv.weight", f"{h}.q_bias", f"{h}.v_bias")
        split = lambda xs: (xs[1], np.zeros_like(xs[1]), xs[2])  # noqa: E731
    else:  # qkv_bias=False
        keys = (f"{h}.qkv.weight",)
        split = lambda xs: [np.zeros(xs[0].shape[0] // 3, xs[0].dtype)] * 3  # noqa: E731

    def to_ours(xs):
        if xs[0].shape[0] % 3:
            raise ValueError("qkv weight rows are not a multiple of 3")
        out = []
        for w, b in zip(np.split(xs[0], 3), split(xs)):
            out += [fk(w), fb(b)]
        return out

    return Rule(keys, names, to_ours, _no_export)


def _vision_rules(v: str, o: str, depth: int, heads: int, tensors: Mapping) -> list[Rule]:
    def cls_pos(xs):
        c, pe = xs
        return [(c.reshape(-1) + pe[0, 0])[None, None], pe[:, 1:]]

    rules = [
        one(f"{v}.embeddings.patch_embedding.weight", f"{o}/embedding/kernel",
            lambda w: w.transpose(2, 3, 1, 0), _no_export),
        one(f"{v}.embeddings.patch_embedding.bias", f"{o}/embedding/bias"),
        Rule((f"{v}.embeddings.class_embedding", f"{v}.embeddings.position_embedding"),
             (f"{o}/cls", f"{o}/pos_embedding"), cls_pos, _no_export),
        *layernorm(f"{v}.post_layernorm", f"{o}/Transformer/encoder_norm"),
    ]
    for i in range(depth):
        h, b = f"{v}.encoder.layers.{i}", f"{o}/Transformer/encoderblock_{i}"
        rules += layernorm(f"{h}.layer_norm1", f"{b}/LayerNorm_0")
        rules.append(_vision_attention(f"{h}.self_attn", f"{b}/MultiHeadDotProductAttention_0",
                                       heads, tensors))
        rules.append(one(f"{h}.self_attn.projection.weight",
                         f"{b}/MultiHeadDotProductAttention_0/out/kernel", *out_kernel(heads)))
        rules.append(one(f"{h}.self_attn.projection.bias",
                         f"{b}/MultiHeadDotProductAttention_0/out/bias"))
        rules += layernorm(f"{h}.layer_norm2", f"{b}/LayerNorm_1")
        rules += linear(f"{h}.mlp.fc1", f"{b}/MlpBlock_0/Dense_0")
        rules += linear(f"{h}.mlp.fc2", f"{b}/MlpBlock_0/Dense_1")
    return rules


def _bert_attention(h: str, o: str, heads: int) -> list[Rule]:
    rules = []
    for n in ("query", "key", "value"):
        rules.append(one(f"{h}.attention.{n}.weight", f"{o}/{n}/kernel", *qkv_kernel(heads)))
        rules.append(one(f"{h}.attention.{n}.bias", f"{o}/{n}/bias", *qkv_bias(heads)))
    rules.append(one(f"{h}.output.dense.weight", f"{o}/out/kernel", *out_kernel(heads)))
    rules.append(one(f"{h}.output.dense.bias", f"{o}/out/bias"))
    return rules


def qformer_rules(hf: str, ours: str, qformer: QFormer) -> list[Rule]:
    """transformers' Blip2QFormerModel keys under ``hf`` ("" or "qformer.") <-> our QFormer."""
    heads, rules = qformer.num_heads, list(layernorm(f"{hf}layernorm", f"{ours}layernorm"))
    for i in range(qformer.depth):
        h, o = f"{hf}encoder.layer.{i}", f"{ours}layer_{i}"
        parts = ["attention"] + (["crossattention"] if i % qformer.cross_attention_frequency == 0
                                 else [])
        for part in parts:
            rules += _bert_attention(f"{h}.{part}", f"{o}/{part}", heads)
            rules += layernorm(f"{h}.{part}.output.LayerNorm", f"{o}/{part}_norm")
        rules += linear(f"{h}.intermediate_query.dense", f"{o}/intermediate_query")
        rules += linear(f"{h}.output_query.dense", f"{o}/output_query")
        rules += layernorm(f"{h}.output_query.LayerNorm", f"{o}/output_query_norm")
    return rules


_TEXT_FFN = re.compile(r"(^|\.)encoder\.layer\.\d+\.(intermediate|output)\.")


def _shapes(model: nn.Module, *args, **kw) -> dict[str, tuple]:
    abstract = jax.eval_shape(model.init, jax.random.key(0), *args, **kw)
    return {k: tuple(a.shape) for k, a in flatten(nn.meta.unbox(abstract)["params"]).items()}


def _params(flat: Mapping[str, np.ndarray]) -> dict:
    return {"params": jax.tree.map(jnp.asarray, unflatten(dict(flat)))}


def _dtype(overrides: Mapping | None) -> Any:
    overrides = dict(overrides or {})
    dtype = overrides.pop("dtype", "float32")
    if overrides:
        raise ValueError(f"BLIP-2 loading supports only the override 'dtype', got {sorted(overrides)}")
    return jnp.dtype(dtype)


# ---------------------------------------------------------------- load / features

def load(path: str, hf_cfg: Mapping, overrides: Mapping | None = None):
    """A Blip2ForConditionalGeneration ("blip-2") or Blip2QFormerModel ("blip_2_qformer")
    directory -> (model, {"params": ...}); overrides: {"dtype": ...} only."""
    dtype = _dtype(overrides)
    if hf_cfg.get("model_type") == "blip_2_qformer":
        return _load_qformer(path, hf_cfg, dtype)
    archs = hf_cfg.get("architectures") or []
    if archs and "Blip2ForConditionalGeneration" not in archs:
        raise ValueError(f"{path}: architectures {archs}: only Blip2ForConditionalGeneration "
                         "directories are read (Blip2Model's get_image_features returns the "
                         "vision tower's output, not the Q-Former's)")
    vc = _sub(hf_cfg, "vision_config", VISION_DEFAULTS)
    qc = _sub(hf_cfg, "qformer_config", QFORMER_DEFAULTS)
    qc["encoder_hidden_size"] = vc["hidden_size"]  # as Blip2Config does
    keep = lambda k: not k.startswith("language_model.") and not _TEXT_FFN.search(k)  # noqa: E731
    tensors = read_safetensors(path, keep=keep)
    if "language_projection.weight" not in tensors:
        raise ValueError(f"{path}: no language_projection.weight; not a "
                         "Blip2ForConditionalGeneration checkpoint")
    out_dim = int(tensors["language_projection.weight"].shape[0])
    nq = int(hf_cfg.get("num_query_tokens", 32))
    model = Blip2FrontEnd(image=_vit(vc, dtype),
                          qformer=_qformer(qc, num_queries=nq, out_dim=out_dim, dtype=dtype))
    img = model.image
    rules = _vision_rules("vision_model", "image", img.depth, img.num_heads, tensors)
    rules += qformer_rules("qformer.", "qformer/", model.qformer)
    rules.append(one("query_tokens", "qformer/query_tokens"))
    rules += linear("language_projection", "qformer/language_projection")
    size = img.image_size if isinstance(img.image_size, int) else img.image_size[0]
    expected = _shapes(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    flat = apply_rules(rules, tensors, expected, f"{path} (Blip2ForConditionalGeneration)",
                       ignored_suffixes=_IGNORED)
    return model, _params(flat)


def _load_qformer(path: str, hf_cfg: Mapping, dtype):
    qc = _sub(hf_cfg, None, QFORMER_DEFAULTS)
    model = _qformer(qc, cls=QFormerModel, num_queries=0, out_dim=None, dtype=dtype)
    tensors = read_safetensors(path, keep=lambda k: not _TEXT_FFN.search(k))
    enc, width = model.encoder_width, model.width
    expected = _shapes(model, jax.ShapeDtypeStruct((1, 1, enc), jnp.float32),
                       queries=jax.ShapeDtypeStruct((1, 1, width), jnp.float32))
    flat = apply_rules(qformer_rules("", "", model), tensors, expected,
                       f"{path} (Blip2QFormerModel)", ignored_suffixes=_IGNORED)
    return model, _params(flat)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


@functools.lru_cache(maxsize=16)
def _frontend_fn(model: Blip2FrontEnd):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


@functools.lru_cache(maxsize=16)
def _qformer_fn(model: QFormerModel):
    def run(params, tokens, queries, mask, query_mask):
        return model.apply({"params": params}, tokens, mask, queries=queries, query_mask=query_mask)
    return jax.jit(run)


def _mask(m, shape: tuple, name: str):
    if m is None:
        return None
    m = _numpy(m)
    if m.shape != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(m.shape)}")
    return m.astype(bool)


def image_features(model, variables: Mapping, pixel_values=None, *, query_embeds=None,
                   encoder_hidden_states=None, image_embeds=None, encoder_attention_mask=None,
                   attention_mask=None, **unexpected) -> np.ndarray:
    """BLIP-2: pixel_values [B, C, H, W] -> [B, num_query_tokens, d_llm] float32
    (= get_image_features(...).pooler_output, the language projection of the query outputs).

    Standalone Q-Former: query_embeds [B or 1, Q, width], encoder_hidden_states (or
    image_embeds) [B, N, encoder_hidden_size], optional encoder_attention_mask [B, N]
    and attention_mask [B, Q] (1 = visible) -> last_hidden_state [B, Q, width].
    """
    if unexpected:
        raise ValueError(f"unexpected inputs {sorted(unexpected)} for {type(model).__name__}")
    params = variables["params"] if "params" in variables else variables
    if isinstance(model, Blip2FrontEnd):
        if pixel_values is None or query_embeds is not None or encoder_hidden_states is not None:
            raise ValueError("a BLIP-2 front-end takes pixel_values [B, C, H, W] only")
        x = _numpy(pixel_values)
        if x.ndim != 4:
            raise ValueError(f"pixel_values must be [B, C, H, W], got shape {x.shape}")
        x = np.transpose(x, (0, 2, 3, 1)).astype(np.float32)
        return np.asarray(_frontend_fn(model)(params, x), np.float32)
    if not isinstance(model, QFormerModel):
        raise ValueError(f"expected a BLIP-2 model from hf_blip2.load, got {type(model).__name__}")
    if encoder_hidden_states is not None and image_embeds is not None:
        raise ValueError("pass the image tokens once: encoder_hidden_states or image_embeds")
    tokens = encoder_hidden_states if encoder_hidden_states is not None else image_embeds
    if pixel_values is not None or tokens is None or query_embeds is None:
        raise ValueError("a standalone Q-Former takes query_embeds [B, Q, width] and "
                         "encoder_hidden_states [B, N, D] (no pixel_values)")
    tokens = _numpy(tokens).astype(np.float32)
    queries = _numpy(query_embeds).astype(np.float32)
    if tokens.ndim != 3 or queries.ndim != 3:
        raise ValueError(f"encoder_hidden_states must be [B, N, D] and query_embeds [B, Q, width]; "
                         f"got {tokens.shape} and {queries.shape}")
    b = tokens.shape[0]
    mask = _mask(encoder_attention_mask, tokens.shape[:2], "encoder_attention_mask")
    qmask = _mask(attention_mask, (b, queries.shape[1]), "attention_mask")
    return np.asarray(_qformer_fn(model)(params, tokens, queries, mask, qmask), np.float32)
