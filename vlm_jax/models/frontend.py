"""Vision front-end of a VLM: image -> tower -> selected features -> connector -> LM tokens.

    front = VisionFrontEnd(tower=ViT(...), connector=Projector(out_dim=2048),
                           feature_layers=-2, drop_cls=True)          # LLaVA-1.5
    tokens = front.apply(variables, images)                            # [B, M, d_llm]

Parameters: ``tower/...`` (the tower's own) and ``connector/...``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import connectors, layers


def _encoder_input(tower: nn.Module, out: dict) -> jax.Array | None:
    """transformers' hidden_states[0] of a ViT: the encoder input (CLS, pre-norm applied).

    Rebuilt from out["with_posemb"] and the bound tower's ``cls`` / ``pre_norm``
    parameters; None when the tower is not a ViT-like module exposing them.
    """
    if "encoder/input" in out:
        return out["encoder/input"]
    if "with_posemb" not in out or not hasattr(tower, "pre_norm"):
        return None
    x = out["with_posemb"]
    params = nn.meta.unbox(tower.variables.get("params", {}))
    if getattr(tower, "pool_type", None) == "tok":
        cls = jnp.broadcast_to(params["cls"].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
    if tower.pre_norm:
        ln = layers.layer_norm(eps=tower.ln_eps, dtype=tower.dtype)
        x = ln.apply({"params": params["pre_norm"]}, x)
    return x


def _needs_input(feature_layers, depth: int) -> bool:
    picks = feature_layers if isinstance(feature_layers, (list, tuple)) else [feature_layers]
    return any(not isinstance(i, str) and int(i) % (depth + 1) == 0 for i in picks)


class VisionFrontEnd(nn.Module):
    """tower -> ``connectors.select_features`` -> connector: images -> [B, M, d_llm].

    tower: a ViT-like module, ``tower(image, train=train) -> (x, out)`` with
      out["encoder/block{i:02d}"] and out["tokens"] (a ViT, or ``connectors.MultiScale``).
    connector: any module called as ``connector(tokens, mask=None, train=False)``
      (see ``connectors.build``); None passes the features through.
    feature_layers: transformers hidden_states index(es) or "final" (see
      ``connectors.select_features``); a list concatenates layers on channels.
    drop_cls: drop the first token before the connector. None: drop it iff the
      tower has a CLS token (pool "tok"). LLaVA's "default" strategy is True (it
      drops the first token whatever the tower), "full" is False.

    __call__(image [B, H, W, C], mask=None, train=False, return_features=False)
      -> tokens [B, M, d_llm], or (tokens, features [B, N', C]) with return_features.
    ``mask`` [B, N'] (True = token) goes to the connector.
    """

    tower: nn.Module
    connector: nn.Module | None = None
    feature_layers: int | str | Sequence[int | str] = -1
    drop_cls: bool | None = None

    def _drop(self) -> bool:
        if self.drop_cls is not None:
            return bool(self.drop_cls)
        return getattr(self.tower, "pool_type", None) == "tok"

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array | None = None, train: bool = False,
                 return_features: bool = False):
        _, out = self.tower(image, train=train)
        out = dict(out)
        depth = sum(1 for k in out if k.startswith("encoder/block"))
        if depth and _needs_input(self.feature_layers, depth):
            x0 = _encoder_input(self.tower, out)
            if x0 is not None:
                out["encoder/input"] = x0
        feats = connectors.select_features(out, self.feature_layers,
                                           "default" if self._drop() else "full",
                                           num_prefix_tokens=1)
        y = feats if self.connector is None else self.connector(feats, mask=mask, train=train)
        return (y, feats) if return_features else y
