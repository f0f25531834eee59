"""Weight import/export with other ecosystems.

    from vlm_jax.interop import hf, big_vision
    model, variables = hf.load("siglip-dir")            # transformers SiglipModel / Siglip2Model / CLIPModel
    hf.save(model, variables, "out-dir")                 # from_pretrained loads it
    model, variables = big_vision.load_npz("siglip.npz") # big_vision SigLIP checkpoints

A checkpoint that does not fit the model built from its config raises
``CheckpointMismatchError`` listing missing keys, unexpected keys and shape
mismatches. Neither module imports torch.

One module per weight format, behind one entry point each:

    hf           transformers SiglipModel / Siglip2Model / CLIPModel directories, and
                 the vision front-ends (tower + connector) of VLM directories, one
                 module per family: hf_llava, hf_paligemma, hf_blip2 (also a standalone
                 Blip2QFormerModel), hf_idefics2 (also a standalone Perceiver Resampler),
                 hf_idefics3; ``hf.load`` picks it from config.json's model_type
    big_vision   big_vision SigLIP .npz checkpoints
    torchvision  torchvision ResNet / ConvNeXt state dicts
    open_clip    open_clip CLIP models (ModifiedResNet and ViT image towers)

Position-embedding resampling: each importer follows the convention of the code
that produced the weights, so a model loaded at another resolution equals what
its own ecosystem would compute:

    big_vision   at load, ``scipy.ndimage.zoom(order=1)`` (linear, corners aligned),
                 as big_vision's loader fine-tunes from (``big_vision.resample_posemb``)
    hf, SigLIP 2 NaFlex grids: per image at run time, bilinear with antialiasing and
                 half-pixel centres, = torch ``F.interpolate(antialias=True)`` as
                 transformers' Siglip2 does (``models/navit.py``)
    hf, SigLIP / CLIP at another input size: no resampling at load; the ViT resizes
                 its learned posemb at run time with ``jax.image.resize`` (bilinear,
                 half-pixel centres). transformers' ``interpolate_pos_encoding``
                 is bicubic instead, so features there differ slightly by design
                 (at the stored size they are identical).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model: names the keys at fault.

    Attributes: ``missing`` (keys the model needs that the file lacks),
    ``unexpected`` (keys in the file that the model has no place for) and
    ``mismatched`` (``(key, got_shape, expected_shape)`` triples).
    """

    def __init__(self, source: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Iterable[tuple[str, tuple, tuple]] = ()):
        self.source = source
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        super().__init__(self._message())

    def _message(self) -> str:
        def block(title, items):
            if not items:
                return []
            shown = [f"    {s}" for s in items[:30]]
            if len(items) > 30:
                shown.append(f"    ... and {len(items) - 30} more")
            return [f"  {title} ({len(items)}):", *shown]

        lines = [f"{self.source} does not match the model:"]
        lines += block("missing keys", self.missing)
        lines += block("unexpected keys", self.unexpected)
        lines += block("shape mismatches (key: checkpoint shape vs expected)",
                       [f"{k}: {tuple(g)} vs {tuple(e)}" for k, g, e in self.mismatched])
        return "\n".join(lines)


def flatten(tree: Mapping, sep: str = "/") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": array}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update({f"{k}{sep}{kk}": vv for kk, vv in flatten(v, sep).items()})
        else:
            out[str(k)] = v
    return out


def unflatten(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
    """{"a/b/c": array} -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def check_against(source: str, flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                  missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                  mismatched: Iterable[tuple] = ()) -> None:
    """Raise CheckpointMismatchError unless ``flat`` has exactly the keys/shapes of ``expected``.

    ``flat``: {path: array}; ``expected``: {path: shape}. Extra problems found
    earlier (e.g. while renaming) are passed in and reported together.
    """
    missing = set(missing) | (set(expected) - set(flat))
    unexpected = set(unexpected) | (set(flat) - set(expected))
    mismatched = list(mismatched) + [
        (k, tuple(np.shape(flat[k])), tuple(expected[k]))
        for k in sorted(set(flat) & set(expected))
        if tuple(np.shape(flat[k])) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


from vlm_jax.interop import big_vision, hf  # noqa: E402  (they use the helpers above)

__all__ = ["CheckpointMismatchError", "big_vision", "hf", "open_clip", "torchvision", "flatten",
           "unflatten", "check_against"]


def __getattr__(name):
    # torchvision / open_clip import on first use (``vlm_jax.interop.torchvision.load``).
    if name in ("torchvision", "open_clip"):
        import importlib  # pylint: disable=import-outside-toplevel
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
