"""vlm_jax: vision encoders of vision-language models in JAX/Flax.

Subpackages: ``models`` (ViT, NaViT, text, two-tower), ``losses``, ``data``,
``parallel``, ``checkpoint``, ``evaluators``, ``interop``, ``inference``.
"""

__version__ = "0.1.0"
