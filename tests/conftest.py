"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

Compilation dominates this suite (tiny models, a few steps each), so tests compile
with XLA's CPU backend optimisations off (``recipes.FAST_XLA_FLAGS``): the programs
and the SPMD partitioning under test are the same, only less optimised machine code.
"""
import os

from recipes import FAST_XLA_FLAGS

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS} "
    "--xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Reference implementations must never try to reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
