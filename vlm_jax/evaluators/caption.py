"""Captioning evaluation: decode held-out images, check what the captions say.

    "caption/attr_accuracy"   fraction of images whose generated caption names the
                              image's colour and shape, and no other colour or
                              shape (shapes data: the truth comes from the
                              example's label, i.e. its rendered attributes,
                              never from the reference caption's words)
    "caption/token_accuracy"  teacher-forced next-token accuracy on the reference
                              captions (each up to and including its EOS)
    "caption/loss"            teacher-forced cross-entropy per counted token

Captions are greedy (``evals.caption.beam_size`` 1) or beam search
(``models.captioner.generate``). Sources other than the shapes data report the
two teacher-forced metrics only. With a workdir, the first 20 captions of each
evaluation go to ``WORKDIR/captions/step_<N>.txt`` (generated, then the truth).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from vlm_jax import parallel
from vlm_jax.models import as_variables


def named_attributes(caption: str) -> tuple[set[str], set[str]]:
  """(colours, kinds) of the shapes data that ``caption`` names (plurals -> singular)."""
  from vlm_jax.data import shapes  # pylint: disable=import-outside-toplevel
  plural = {p: k for k, p in shapes.KIND_PLURALS.items()}
  words = re.findall(r"[a-z]+", caption.lower())
  colours = {w for w in words if w in shapes.COLOURS}
  kinds = {plural.get(w, w) for w in words if w in shapes.KINDS or w in plural}
  return colours, kinds


def attr_correct(caption: str, colour: str, kind: str) -> bool:
  """True when ``caption`` names exactly ``colour`` and ``kind`` (singular or plural)."""
  colours, kinds = named_attributes(caption)
  return colours == {colour} and kinds == {kind}


class CaptionEvaluator:
  """Held-out captioning metrics (``config.evals.caption``; see the module docstring).

  Args:
    config: the run's config (``evals.caption``, ``data``, ``pp``, ``tokenizer``).
    model: a ``models.captioner.Captioner``.
    mesh: optional mesh the params live on (decoding batches are split over it).
    tokenizer: optional; built from ``config.tokenizer`` when None.
    workdir: where the sample captions go (None: nowhere).
  """

  name = "caption"

  def __init__(self, config, model, *, mesh=None, encoder=None, tokenizer=None, workdir=None,
               data=None):
    del encoder  # decoding needs the captioner itself
    # pylint: disable=import-outside-toplevel
    from vlm_jax.data import tokenizers
    from vlm_jax.evaluators.data import read_split, section_data
    from vlm_jax.models import captioner
    from vlm_jax.tasks import captioning
    sec = config.evals.caption
    self.model, self.mesh, self.workdir = model, mesh, workdir
    self.tokenizer = tokenizer or tokenizers.build_tokenizer(config.tokenizer)
    self.batch_size = int(sec.get("batch_size", 250))
    if self.batch_size < 1:
      raise ValueError(f"config.evals.caption.batch_size must be >= 1, got {self.batch_size}")
    self.max_len = int(sec.get("max_len", 0) or self.tokenizer.max_len)
    beam = int(sec.get("beam_size", 1))
    if beam < 1:
      raise ValueError(f"config.evals.caption.beam_size must be >= 1, got {beam}")
    if data is None:
      data = read_split(config, sec, sec.split, sec.get("num_examples", 500),
                        what="evals.caption")
    self.images = data["images"]
    self.references = [t[0] for t in data["texts"]]
    self.tokens = np.asarray(self.tokenizer.encode(self.references), np.int32)
    self.truth = None
    names, labels = data.get("classnames"), np.asarray(data["labels"])
    if section_data(config, sec).get("source") == "shapes" and names and np.all(labels >= 0):
      self.truth = [tuple(names[i].split(" ", 1)) for i in labels]   # (colour, kind)
    eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
    if eos is None:
      raise ValueError("captioning needs a tokenizer with an EOS id")
    self._generate = captioner.generate_fn(model, max_len=self.max_len, eos_id=int(eos),
                                           pad_id=int(pad), beam_size=beam)

    def forced(variables, images, tokens, rows):
      logits, _ = model.apply(variables, images, tokens)
      return captioning.caption_loss(logits, tokens, eos, pad, row_weights=rows)
    self._forced = jax.jit(forced)

  def _chunks(self, *arrays):
    """Yields (n_valid, padded chunks) of ``batch_size`` rows, placed on the mesh."""
    n = len(arrays[0])
    shards = parallel.num_batch_shards(self.mesh) if self.mesh is not None else 1
    bs = max(shards, self.batch_size - self.batch_size % shards)
    rows = bs if n >= bs else n + (-n) % shards
    for i in range(0, n, bs):
      out = []
      for a in arrays:
        c = a[i:i + bs]
        m = len(c)
        if m < rows:
          fill = np.zeros_like(c[-1:]) if a.ndim == 1 else c[-1:]  # 1-D: row weights -> 0
          c = np.concatenate([c, np.repeat(fill, rows - m, axis=0)])
        if self.mesh is not None:
          c = jax.device_put(c, parallel.batch_sharding(self.mesh, c.ndim))
        out.append(c)
      yield m, out

  def captions(self, params, images=None) -> list[str]:
    """Generated captions of ``images`` (default: the evaluation images)."""
    variables = as_variables(params)
    out = []
    for m, (chunk,) in self._chunks(self.images if images is None else np.asarray(images)):
      tokens, _ = self._generate(variables, chunk)
      out += self.tokenizer.decode(np.asarray(jax.device_get(tokens))[:m])
    return out

  def run(self, params, step: int | None = None) -> dict:
    variables = as_variables(params)
    total = count = correct = 0.0
    valid = np.ones((len(self.images),), np.float32)
    for _, (images, tokens, rows) in self._chunks(self.images, self.tokens, valid):
      t, c, k = self._forced(variables, images, tokens, rows)  # padding rows weigh 0
      total, count, correct = total + float(t), count + float(c), correct + float(k)
    metrics = {"caption/token_accuracy": correct / max(count, 1.0),
               "caption/loss": total / max(count, 1.0)}
    if self.truth is not None:
      caps = self.captions(params)
      ok = [attr_correct(c, *truth) for c, truth in zip(caps, self.truth)]
      metrics["caption/attr_accuracy"] = float(np.mean(ok))
      self._write(step, caps)
    return metrics

  def _write(self, step, caps) -> None:
    if not self.workdir or jax.process_index() != 0:
      return
    d = os.path.join(self.workdir, "captions")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"step_{int(step or 0)}.txt"), "w") as f:
      for c, ref in list(zip(caps, self.references))[:20]:
        one_line = " ".join(c.split())  # an untrained model may emit newlines, tabs
        f.write(f"{one_line}\t| {ref}\n")
