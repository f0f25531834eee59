"""Captioning: the causal decoder, the captioner's two modes, the loss, decoding, the recipe."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
import numpy as np
import pytest

from recipes import ROOT, get_config, subprocess_env
from vlm_jax import checkpoint, finetune, inference, models
from vlm_jax.evaluators.caption import attr_correct
from vlm_jax.models.captioner import Captioner, beam_search, greedy_decode, sequence_scores
from vlm_jax.models.decoder import CausalDecoder
from vlm_jax.tasks import captioning

V, L = 23, 9  # odd vocabulary and length


def _tiny_captioner(mode, connector):
  c = get_config("captioner_shapes", f"runlocal,mode={mode},connector={connector},tokens=5")
  c.model.text.width, c.model.text.num_heads, c.model.text.max_len = 30, 3, L
  c.model.text.vocab_size = V
  return c, models.build(c.model)


@pytest.fixture(scope="module")
def prefix_model():
  c, model = _tiny_captioner("prefix", "mlp")
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, L), 2, V)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens))
  return c, model, variables, images, tokens


@pytest.mark.parametrize("cross", [False, True])
def test_decoder_future_tokens_do_not_change_past_logits(cross):
  dec = CausalDecoder(vocab_size=V, width=30, depth=2, num_heads=3, mlp_dim=44, max_len=L,
                      cross_attention=cross, gate_init=0.5)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, L), 0, V)
  image = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 30))
  kw = {"context": image} if cross else {"prefix": image}
  variables = dec.init(jax.random.PRNGKey(2), tokens, **kw)
  fn = jax.jit(lambda t, x: dec.apply(variables, t, **({"context": x} if cross else {"prefix": x}))[0])
  base = fn(tokens, image)
  assert base.shape == (2, L, V)
  for t in (0, 4, L - 1):
    changed = tokens.at[:, t:].set((tokens[:, t:] + 5) % V)
    out = fn(changed, image)
    # logits[:, t] predicts tokens[:, t]: positions <= t never see tokens[:, t:].
    np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(base[:, :t + 1]))
    if t < L - 1:
      assert not np.allclose(out[:, t + 1:], base[:, t + 1:])
  # The image conditions every position (including the first, from BOS alone).
  other = fn(tokens, image + 1.0)
  assert np.all(np.abs(np.asarray(other - base)).max(axis=-1) > 0)


def test_prefix_and_cross_captioners_give_logits_for_every_text_position(prefix_model):
  c, model, variables, images, tokens = prefix_model
  logits, out = jax.eval_shape(lambda v: model.apply(v, images, tokens), variables)
  assert logits.shape == (3, L, V) and out["visual"].shape == (3, 16, 30)  # 4x4 grid, all tokens
  assert set(variables["params"]) == {"img", "connector", "decoder"}
  c2, cross = _tiny_captioner("cross", "perceiver")
  v2 = jax.eval_shape(cross.init, jax.random.PRNGKey(0), images, tokens)
  visual = jax.eval_shape(lambda v: cross.apply(v, images, method="encode_image"), v2)
  assert visual.shape == (3, 5, 30)  # 5 perceiver latents
  assert "CrossAttention" in v2["params"]["decoder"]["block_0"]
  assert "cross_gate" in v2["params"]["decoder"]["block_0"]
  assert "CrossAttention" not in variables["params"]["decoder"]["block_0"]
  # The image tower is the two-tower demo's (pool "none": no MAP head), so a
  # contrastive run's img/... tensors load by path, and "^img/" freezes exactly it.
  two = get_config("siglip_shapes", "runlocal")
  tt = models.abstract_variables(models.build(two.model), two)
  flat = lambda t: {k: v.shape for k, v in traverse_util.flatten_dict(t, sep="/").items()}
  mine, theirs = flat(variables["params"]["img"]), flat(tt["params"]["img"])
  assert mine and all(theirs.get(k) == s for k, s in mine.items())
  assert set(theirs) - set(mine) and all(k.startswith("MAPHead_0") for k in set(theirs) - set(mine))
  c.finetune.freeze = r"^img/"
  mask = traverse_util.flatten_dict(finetune.trainable(c, variables["params"]), sep="/")
  assert all(not m for k, m in mask.items() if k.startswith("img/"))
  assert all(m for k, m in mask.items() if not k.startswith("img/"))


def test_loss_counts_each_caption_up_to_its_eos_and_ignores_padding():
  tokens = jnp.array([[5, 6, 1, 0, 0, 0], [7, 1, 0, 0, 0, 0]])   # EOS = 1, pad = 0
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 11))
  total, count, correct = captioning.caption_loss(logits, tokens, 1, 0)
  assert float(count) == 5  # 3 + 2 tokens, each EOS included
  junk = logits.at[0, 3:].set(100.0).at[1, 2:].set(-7.0)  # anything after EOS
  total2, count2, _ = captioning.caption_loss(junk, tokens, 1, 0)
  assert float(total2) == pytest.approx(float(total)) and float(count2) == 5
  logp = jax.nn.log_softmax(logits)
  want = -sum(float(logp[0, t, tokens[0, t]]) for t in range(3)) - sum(
      float(logp[1, t, tokens[1, t]]) for t in range(2))
  assert float(total) == pytest.approx(want, rel=1e-5)
  perfect = jax.nn.one_hot(tokens, 11) * 50.0
  assert float(captioning.caption_loss(perfect, tokens, 1, 0)[2]) == 5
  # An EOS inside the padding of row 0 does not restart counting.
  assert float(captioning.caption_loss(logits, tokens.at[0, 4].set(1), 1, 0)[1]) == 5


def _toy_logits_fn(tokens):
  """V = 4 (0 pad, 1 EOS, 2 'a', 3 'b'); depends on tokens[:, 0] only.

  t = 0: p(a) = 0.55, p(b) = 0.45. After "a": p(EOS) = 0.34, p(a) = p(b) = 0.33.
  After "b": p(EOS) = 0.97. Greedy: "a EOS" (0.187); best: "b EOS" (0.4365).
  """
  n, length = tokens.shape
  first = jnp.log(jnp.array([1e-6, 1e-6, 0.55, 0.45]))
  after_a = jnp.log(jnp.array([1e-6, 0.34, 0.33, 0.33]))
  after_b = jnp.log(jnp.array([1e-6, 0.97, 0.015, 0.015]))
  later = jnp.where((tokens[:, :1] == 2)[..., None], after_a, after_b)   # [n, 1, 4]
  out = jnp.broadcast_to(later, (n, length, 4))
  return out.at[:, 0].set(first)


def test_beam_search_finds_the_better_caption_that_greedy_misses():
  g_tokens, g_score = jax.jit(lambda: greedy_decode(_toy_logits_fn, 2, 5, eos_id=1))()
  b_tokens, b_score = jax.jit(lambda: beam_search(_toy_logits_fn, 2, 5, 2, eos_id=1))()
  one_tokens, one_score = jax.jit(lambda: beam_search(_toy_logits_fn, 2, 5, 1, eos_id=1))()
  np.testing.assert_array_equal(g_tokens, [[2, 1, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(b_tokens, [[3, 1, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(one_tokens, g_tokens)
  np.testing.assert_allclose(g_score, np.log(0.55 * 0.34) * np.ones(2), rtol=1e-5)
  np.testing.assert_allclose(b_score, np.log(0.45 * 0.97) * np.ones(2), rtol=1e-5)
  np.testing.assert_allclose(one_score, g_score, rtol=1e-6)
  # The scores are the sequences' log-probabilities under the model.
  np.testing.assert_allclose(sequence_scores(_toy_logits_fn(b_tokens), b_tokens, 1), b_score,
                             rtol=1e-5)


def test_caption_decodes_greedily_and_beam_search_scores_at_least_as_well(prefix_model):
  _, model, variables, images, _ = prefix_model
  images = np.asarray(images)
  tok = _Tok()
  g, gs = inference.caption(model, variables, list(images), tokenizer=tok, return_scores=True)
  assert len(g) == 3 and all(isinstance(s, str) for s in g)
  # The greedy caption is, token by token, the argmax of the model's own logits.
  ids = np.zeros((3, L), np.int32)
  decode = jax.jit(lambda x: model.apply(
      variables, model.apply(variables, images, method="encode_image"), x, method="decode"))
  for t in range(L):
    nxt = np.argmax(np.asarray(decode(jnp.asarray(ids)))[:, t], -1)
    ids[:, t] = np.where((ids[:, :t] == 1).any(axis=1), 0, nxt)
  assert tok.decode(ids) == g
  np.testing.assert_allclose(gs, sequence_scores(decode(jnp.asarray(ids)), jnp.asarray(ids), 1),
                             rtol=1e-5)
  _, b3s = inference.caption(model, variables, list(images), tokenizer=tok, beam_size=3,
                             return_scores=True)
  assert np.all(b3s >= gs - 1e-5)  # here the greedy path stays among the 3 beams
  with pytest.raises(ValueError, match="beam_size"):
    inference.caption(model, variables, list(images), tokenizer=tok, beam_size=0)


class _Tok:
  """A tokenizer for V ids: 0 pad, 1 EOS, i >= 2 -> chr(ord('a') + i - 2)."""
  pad_id, eos_id, vocab_size = 0, 1, V

  def decode(self, tokens):
    out = []
    for row in np.asarray(tokens).tolist():
      s = ""
      for t in row:
        if t == 1:
          break
        s += chr(ord("a") + t - 2) if t >= 2 else ""
      out.append(s)
    return out


def test_attr_accuracy_needs_the_right_colour_and_shape_and_no_other():
  assert attr_correct("two small red triangles on a plain background", "red", "triangle")
  assert attr_correct("a red triangle at the top", "red", "triangle")
  assert not attr_correct("a red square", "red", "triangle")
  assert not attr_correct("a red blue triangle", "red", "triangle")
  assert not attr_correct("a triangle", "red", "triangle")


def test_runlocal_trains_through_the_cli_with_caption_metrics(tmp_path):
  workdir = str(tmp_path / "cap")
  cmd = [sys.executable, "-m", "vlm_jax.train", "--config",
         "configs/captioner_shapes.py:runlocal", "--workdir", workdir,
         "--config.data.num_threads=0", "--config.total_steps=4", "--config.log_every=2",
         "--config.checkpoint_every=4", "--config.eval_every=4"]
  run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(0.0 <= r["train/token_accuracy"] <= 1.0 for r in train_rows)
  evals = [r for r in rows if "caption/attr_accuracy" in r]
  assert [r["step"] for r in evals] == [4]
  r = evals[0]
  assert 0.0 <= r["caption/attr_accuracy"] <= 1.0 and 0.0 <= r["caption/token_accuracy"] <= 1.0
  assert np.isfinite(r["caption/loss"])
  with open(os.path.join(workdir, "captions", "step_4.txt")) as f:
    assert len(f.read().splitlines()) == 20  # generated caption | reference, 20 images
  ck = checkpoint.load(workdir)  # a captioner, ready for inference.caption
  assert ck.step == 4 and isinstance(ck.model, Captioner)
  assert set(ck.params) == {"img", "connector", "decoder"}


def test_bad_configs_are_named():
  c = get_config("captioner_shapes", "runlocal")
  c.model.captioner.mode = "sideways"
  with pytest.raises(ValueError, match="model.captioner.mode"):
    models.build(c.model)
  c = get_config("captioner_shapes", "runlocal")
  c.model.captioner.mode = ""
  with pytest.raises(ValueError, match="needs a captioner"):
    captioning.prepare_config(c)
  c = get_config("captioner_shapes", "runlocal")
  c.tokenizer.max_len = 64
  with pytest.raises(ValueError, match="tokenizer.max_len"):
    captioning.prepare_config(c)
  with pytest.raises(ValueError, match="mode"):
    get_config("captioner_shapes", "mode=sideways")
