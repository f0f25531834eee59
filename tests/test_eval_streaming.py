"""Evaluation streams its data: memory stays flat as the evaluation set grows, every
example is counted once however the set is split over processes, and the streamed
metrics equal the in-memory computation."""
import gc
import tracemalloc

import jax
import numpy as np
import pytest

from recipes import get_config
from vlm_jax import models
from vlm_jax.data import eval_stream, preprocess, shapes, tokenizers
from vlm_jax.evaluators import Encoder, ZeroShotEvaluator, zeroshot
from vlm_jax.evaluators import data as eval_data
from vlm_jax.numeric import normalize

N = 64  # the small evaluation set; the large one has 4N examples
BATCH = 16


def _config(heldout_size):
  c = get_config("siglip_shapes", "runlocal")
  c.data.shapes.heldout_size = heldout_size
  c.data.num_threads, c.data.prefetch_buffer_size = 2, 8
  c.evals.zeroshot.num_examples, c.evals.zeroshot.batch_size = -1, BATCH
  return c


@pytest.fixture(scope="module")
def tiny():
  """The runlocal two-tower with random weights (no init compile), and its encoder."""
  c = _config(N)
  model = models.build(c.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        models.abstract_variables(model, c))["params"]
  return model, params, Encoder(model, batch_size=BATCH)


def _peak_bytes(fn):
  """Peak host bytes (numpy buffers included) allocated while ``fn()`` runs."""
  gc.collect()
  tracemalloc.start()
  try:
    base = tracemalloc.get_traced_memory()[0]
    fn()
    return tracemalloc.get_traced_memory()[1] - base
  finally:
    tracemalloc.stop()


def test_zeroshot_memory_stays_flat_as_the_set_grows(tiny):
  model, params, encoder = tiny
  ZeroShotEvaluator(_config(N), model, encoder=encoder).run(params)  # compiles, unmeasured
  streamed = {n: _peak_bytes(lambda n=n: ZeroShotEvaluator(
      _config(n), model, encoder=encoder).run(params)) for n in (N, 4 * N)}
  in_memory = {n: _peak_bytes(lambda n=n: eval_data.read_split(
      _config(n), _config(n).evals.zeroshot, "heldout", -1)) for n in (N, 4 * N)}
  grown = 3 * N * 32 * 32 * 3 * 4  # bytes of the 3N extra float32 images
  # The measurement sees numpy buffers: holding the images grows with them...
  assert in_memory[4 * N] - in_memory[N] > 0.9 * grown
  # ...streaming keeps one batch and running counts: 4x the examples, the same peak.
  assert streamed[4 * N] - streamed[N] < 0.05 * grown, (streamed, in_memory)
  assert streamed[4 * N] < in_memory[4 * N] / 2


def test_streamed_zeroshot_equals_the_in_memory_computation(tiny):
  model, params, encoder = tiny
  c = _config(N + 5)  # not a multiple of the batch: the last batch is padded
  held = eval_data.read_split(c, c.evals.zeroshot, "heldout", -1)
  templates = list(held["templates"])
  # Class embeddings in batches of 8 prompts (2 classes of 4 templates) equal one call.
  tok = tokenizers.build_tokenizer(c.tokenizer)
  prompts = [p for row in shapes.class_prompts(held["classnames"], templates) for p in row]
  whole = normalize(encoder.tokens(params, tok.encode(prompts)))
  whole = normalize(whole.reshape(len(held["classnames"]), len(templates), -1).mean(1))
  batched = zeroshot.class_embeddings(encoder, params, tok, held["classnames"], templates,
                                      batch_size=8)
  np.testing.assert_allclose(batched, whole, atol=1e-5)
  expected = zeroshot.top1(encoder.images(params, held["images"]), whole, held["labels"])
  ev = ZeroShotEvaluator(c, model, encoder=encoder)
  assert ev.run(params)["zeroshot/top1"] == pytest.approx(expected, abs=1e-12)
  assert len(ev.predict(params)) == N + 5


class _Source:
  """12 examples; 4 and 9 are corrupt. Image i is filled with the value i."""
  classnames = ("a", "b")

  def __len__(self):
    return 12

  def __getitem__(self, i):
    if i in (4, 9):
      raise preprocess.CorruptExampleError(f"example {i} is corrupt")
    return dict(image=np.full((16, 16, 3), i * 10, np.uint8), text=f"caption {i}", label=i % 2)


@pytest.mark.parametrize("processes", [1, 3])
def test_every_example_is_read_once_over_processes_and_corrupt_ones_are_counted(processes):
  c = _config(N)
  c.pp.image_size = 16
  splits = [eval_stream.EvalSplit(_Source(), c.pp, num_examples=11, process_index=p,
                                  process_count=processes, num_threads=1)
            for p in range(processes)]
  shapes_seen, seen, skipped = set(), [], 0
  for s in splits:
    batches = list(s.batches(8, multiple=2))
    assert len(batches) == s.num_batches(8, multiple=2) == splits[0].num_batches(8, multiple=2)
    for b in batches:
      shapes_seen.add(b["image"].shape)
      assert len(b["image"]) % 2 == 0
      for i in np.flatnonzero(b["valid"]):
        k = int(b["index"][i])
        assert b["texts"][i] == [f"caption {k}"] and b["label"][i] == k % 2
        assert b["image"][i, 0, 0, 0] == pytest.approx(k * 10 / 127.5 - 1)
        seen.append(k)
      assert not b["valid"][b["index"] < 0].any()
    skipped += s.num_skipped
  assert len(shapes_seen) == 1  # every batch on every process has one shape
  assert sorted(seen) == [0, 1, 2, 3, 5, 6, 7, 8, 10]  # example 11 is past num_examples
  assert skipped == 2
