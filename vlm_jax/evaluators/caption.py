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
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from vlm_jax import parallel
from vlm_jax.evaluators.data import eval_split, gather_objects, process_sum, section_data
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

  The split is streamed in batches (each process reading its share), captioned and
  scored batch by batch; only running sums and the first 20 captions are kept.

  Args:
    config: the run's config (``evals.caption``, ``data``, ``pp``, ``tokenizer``).
    model: a ``models.captioner.Captioner``.
    mesh: optional mesh the params live on (decoding batches are split over it).
    tokenizer: optional; built from ``config.tokenizer`` when None.
    workdir: where the sample captions go (None: nowhere).
    data: optional ``EvalSplit`` or dict(images, texts, labels, classnames); read
      from the config when None.
  """

  name = "caption"

  def __init__(self, config, model, *, mesh=None, encoder=None, tokenizer=None, workdir=None,
               data=None):
    del encoder  # decoding needs the captioner itself
    # pylint: disable=import-outside-toplevel
    from vlm_jax.data import eval_stream, tokenizers
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
      data = eval_split(config, sec, sec.split, sec.get("num_examples", 500),
                        what="evals.caption")
    self.data = eval_stream.as_split(data)
    # Shapes data: the truth (colour, kind) of an example is its label's class name.
    self.check_attributes = bool(section_data(config, sec).get("source") == "shapes"
                                 and self.data.classnames)
    self.num_skipped = 0  # corrupt examples the last run left out (all processes)
    eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
    if eos is None:
      raise ValueError("captioning needs a tokenizer with an EOS id")
    self._generate = captioner.generate_fn(model, max_len=self.max_len, eos_id=int(eos),
                                           pad_id=int(pad), beam_size=beam)

    def forced(variables, images, tokens, rows):
      logits, _ = model.apply(variables, images, tokens)
      return captioning.caption_loss(logits, tokens, eos, pad, row_weights=rows)
    self._forced = jax.jit(forced)

  def _multiple(self) -> int:
    """Rows of a process-local batch must be a multiple of this process's batch shards."""
    if self.mesh is None:
      return 1
    return max(1, parallel.num_batch_shards(self.mesh) // jax.process_count())

  def _global(self, x: np.ndarray):
    """This process's rows -> one global batch on the mesh (all processes' rows)."""
    if self.mesh is None:
      return x
    lead = parallel.batch_sharding(self.mesh, 1).spec[0]
    return multihost_utils.host_local_array_to_global_array(
        x, self.mesh, P(lead, *([None] * (x.ndim - 1))))

  @staticmethod
  def _host(y) -> np.ndarray:
    """A global array -> numpy with every process's rows (in the global batch's order)."""
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(y, tiled=True))
    return np.asarray(jax.device_get(y))

  def _chunks(self, *arrays):
    """Yields (n_valid, padded chunks) of ``batch_size`` rows, placed on the mesh
    (in-memory ``captions(params, images)``; every process passes the same arrays)."""
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
          c = np.concatenate([c, np.repeat(c[-1:], rows - m, axis=0)])
        if self.mesh is not None:
          c = jax.device_put(c, parallel.batch_sharding(self.mesh, c.ndim))
        out.append(c)
      yield m, out

  def captions(self, params, images=None) -> list[str]:
    """Generated captions of ``images`` float32 [N,H,W,3]; by default of the evaluation
    split's readable examples (every process's), in split order."""
    variables = as_variables(params)
    if images is not None:
      out = []
      for m, (chunk,) in self._chunks(np.asarray(images)):
        tokens, _ = self._generate(variables, chunk)
        out += self.tokenizer.decode(np.asarray(jax.device_get(tokens))[:m])
      return out
    got = {}
    for batch in self.data.batches(self.batch_size, multiple=self._multiple()):
      tokens, _ = self._generate(variables, self._global(batch["image"]))
      index = self._host(self._global(batch["index"]))
      keep = np.flatnonzero(index >= 0)
      got.update(zip(index[keep].tolist(),
                     self.tokenizer.decode(self._host(tokens)[keep])))
    return [got[i] for i in sorted(got)]

  def run(self, params, step: int | None = None) -> dict:
    variables = as_variables(params)
    names = self.data.classnames
    total = count = correct = 0.0
    right = seen = 0
    samples = []  # (index, generated caption) of the first 20 examples
    firsts = []   # (index, reference) of this process's first 20 examples
    for batch in self.data.batches(self.batch_size, multiple=self._multiple()):
      refs = [t[0] if t else "" for t in batch["texts"]]
      images = self._global(batch["image"])
      t, c, k = self._forced(variables, images,  # padding rows weigh 0
                             self._global(np.asarray(self.tokenizer.encode(refs), np.int32)),
                             self._global(batch["valid"].astype(np.float32)))
      total, count, correct = total + float(t), count + float(c), correct + float(k)
      firsts = (firsts + [(int(i), refs[r]) for r, i in enumerate(batch["index"]) if i >= 0])[:20]
      if not self.check_attributes:
        continue
      # Every process scores the whole global batch (captions are gathered, small).
      tokens, _ = self._generate(variables, images)
      index = self._host(self._global(batch["index"]))
      labels = self._host(self._global(batch["label"]))
      keep = np.flatnonzero((index >= 0) & (labels >= 0))
      caps = self.tokenizer.decode(self._host(tokens)[keep])
      for i, label, cap in zip(index[keep], labels[keep], caps):
        right += attr_correct(cap, *names[label].split(" ", 1))
        seen += 1
        samples.append((int(i), cap))
      samples = sorted(samples)[:20]
    self.num_skipped = int(process_sum(self.data.num_skipped))
    if not count:
      raise ValueError("evals.caption: the split gave no readable examples")
    metrics = {"caption/token_accuracy": correct / max(count, 1.0),
               "caption/loss": total / max(count, 1.0)}
    if self.check_attributes:
      metrics["caption/attr_accuracy"] = right / max(seen, 1)
      refs = dict(p for per_process in gather_objects(firsts) for p in per_process)
      self._write(step, [(cap, refs[i]) for i, cap in samples])
    return metrics

  def _write(self, step, pairs) -> None:
    """``pairs``: (generated, reference) of the first examples."""
    if not self.workdir or jax.process_index() != 0:
      return
    d = os.path.join(self.workdir, "captions")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"step_{int(step or 0)}.txt"), "w") as f:
      for c, ref in pairs[:20]:
        one_line = " ".join(c.split())  # an untrained model may emit newlines, tabs
        f.write(f"{one_line}\t| {ref}\n")
