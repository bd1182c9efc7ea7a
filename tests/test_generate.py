"""KV-cache generation against the full forward pass, and the paper's decoding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lima_jax import decoding, sharding
from lima_jax.decoding import (Decoding, Generator, next_tokens, nucleus, penalize_repetition,
                               prompt_bucket, prompt_seen, sampling_logits)
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer

EOT = 99
CONTEXT = 64
GREEDY = Decoding(greedy=True)  # with the paper's repetition penalty 1.2


@pytest.fixture(scope="module")
def model():
  cfg = LlamaConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
  trainer = Trainer(cfg, optax.identity(), optax.constant_schedule(0.0),
                    sharding.make_mesh(2, 2, 2), 0)
  # Larger weights than the init's make peaked logits: no near-ties for float noise to flip.
  params = jax.jit(lambda p: jax.tree.map(lambda x: x * 6, p))(trainer.init(0)["params"])
  return trainer, params


@pytest.fixture(scope="module")
def generator(model):
  return Generator(model[0], EOT, batch_size=4)  # one instance: its compiles are reused


def prompts(*lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, EOT, n).astype(np.int32) for n in lengths]


def run(generator, params, batch, *, max_new=10, decoding=GREEDY, use_cache=True):
  return generator.generate(params, batch, max_new=max_new, context=CONTEXT, decoding=decoding,
                            use_cache=use_cache)


def assert_same(got, want):
  assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_cached_greedy_equals_full_forward_single_and_batched(model, generator):
  params = model[1]
  single = prompts(20)
  assert_same(run(generator, params, single), run(generator, params, single, use_cache=False))
  # Five prompts of different lengths: two batches, left-padded (cache) vs right-padded (full).
  batch = prompts(5, 17, 3, 9, 30, seed=1)
  cached = run(generator, params, batch)
  assert_same(cached, run(generator, params, batch, use_cache=False))
  assert all(len(ids) == 10 for ids in cached)  # no EOT in range: each runs to max_new
  # A prompt's answer does not depend on its batch neighbours or their padding.
  assert_same(run(generator, params, batch[2:3]), cached[2:3])


def test_sampling_is_reproducible_for_a_seed(model, generator):
  trainer, params = model
  batch = prompts(4, 11, 6, 8, 13, seed=2)
  paper = Decoding()  # top-p 0.9, temperature 0.7, penalty 1.2
  first = run(generator, params, batch, decoding=paper)
  assert_same(run(generator, params, batch, decoding=paper), first)
  # Keys follow the prompt's index, not its batch: a bigger batch samples the same.
  assert_same(run(Generator(trainer, EOT, batch_size=8), params, batch, decoding=paper), first)
  other = run(generator, params, batch, decoding=Decoding(seed=1))
  assert [o.tolist() for o in other] != [f.tolist() for f in first]


def test_generation_stops_at_eot(model, generator):
  trainer, params = model
  batch = prompts(6, 12, 4, 20, seed=3)
  free = run(Generator(trainer, -1, batch_size=4), params, batch, max_new=12)  # no EOT: no stop
  # Call a token row 0 emits at step 3 (and not before) the EOT: rows stop right after it.
  eot = next(t for i, t in enumerate(free[0].tolist()) if i >= 3 and t not in free[0][:i])
  stopped = run(Generator(trainer, int(eot), batch_size=4), params, batch, max_new=12)
  for got, ids in zip(stopped, free):
    ids = ids.tolist()
    want = ids[:ids.index(eot) + 1] if eot in ids else ids
    assert got.tolist() == want
  assert stopped[0][-1] == eot and len(stopped[0]) < 12
  # Several stop ids (EOT and a model's own end ids): each row stops at the first of any.
  other = next(t for t in free[1].tolist() if t != eot)
  either = run(Generator(trainer, (-1, eot, other), batch_size=4), params, batch,
               max_new=12)
  for got, ids in zip(either, free):
    ids = ids.tolist()
    ends = [i for i, t in enumerate(ids) if t in (eot, other)]
    assert got.tolist() == (ids[:ends[0] + 1] if ends else ids)
  assert either[1][-1] == other and len(either[1]) < 12


def test_prompt_and_answer_stay_within_the_context(model, generator):
  params = model[1]
  out = run(generator, params, prompts(CONTEXT - 3, 5, seed=4), max_new=10)
  assert [len(ids) for ids in out] == [3, 10]
  with pytest.raises(ValueError):
    run(generator, params, prompts(CONTEXT))


def test_repetition_penalty_matches_a_hand_computed_case():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
  seen = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(penalize_repetition(logits, seen, 1.2),
                             [[2.0 / 1.2, -1.2, 0.5, 3.0]], rtol=1e-6)
  # Greedy picks after the penalty: 3.0 / 1.2 = 2.5 loses to an unseen 2.6.
  settings = Decoding(greedy=True).settings()
  keys = jax.random.split(jax.random.key(0), 1)
  close = jnp.array([[3.0, 2.6]])
  assert int(next_tokens(close, jnp.array([[True, False]]), keys, 0, settings, True)[0]) == 1
  assert int(next_tokens(close, jnp.array([[False, False]]), keys, 0, settings, True)[0]) == 0


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(nucleus(logits, p)))[0].tolist()
  assert kept(0.5) == [False, True, False, False]
  assert kept(0.79) == [False, True, False, True]
  assert kept(0.81) == [False, True, True, True]
  assert kept(1.0) == [True, True, True, True]


def test_prompt_buckets_limit_compiles():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 2048)] == [16, 16, 32, 128, 2048]


def _first_token_probs(logits, prompt, penalize_prompt):
  """Our distribution of the first new token: the prompt's seen-mask, then penalty, temperature
  and nucleus, exactly as the decode loop applies them."""
  settings = Decoding(penalize_prompt=penalize_prompt).settings()
  seen = prompt_seen(prompt, jnp.ones(prompt.shape, bool), logits.shape[-1], settings)
  return np.asarray(jax.nn.softmax(sampling_logits(logits, seen, settings), axis=-1))


@pytest.mark.parametrize("penalize_prompt", [True, False])
def test_first_token_probabilities_match_transformers_processors(penalize_prompt):
  """With penalize_prompt, transformers' reading: every prompt token is penalised. Without it,
  the paper's: nothing is generated yet, so nothing is; transformers' processors agree when they
  see no prompt. The prompts hold each row's likeliest tokens, so penalising them (or not)
  moves the distribution far beyond the tolerance."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  lp = transformers.generation.logits_process
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 100)) * 3).astype(np.float32)
  prompt = np.argsort(-logits, axis=-1)[:, :5].astype(np.int32)  # includes negative logits too
  prompt[:, -1] = np.argsort(logits, axis=-1)[:, 0]
  ours = _first_token_probs(jnp.asarray(logits), jnp.asarray(prompt), penalize_prompt)
  processors = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2),
                                       lp.TemperatureLogitsWarper(0.7), lp.TopPLogitsWarper(0.9)])
  seen_by_them = torch.tensor(prompt if penalize_prompt else prompt[:, :0], dtype=torch.long)
  theirs = torch.softmax(processors(seen_by_them, torch.tensor(logits)), dim=-1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=4e-6)
  other = _first_token_probs(jnp.asarray(logits), jnp.asarray(prompt), not penalize_prompt)
  assert np.abs(other - theirs).max() > 0.05  # the setting matters at this tolerance


def test_penalize_prompt_decides_whether_prompt_tokens_are_penalised(model, generator):
  """Through the generator, greedy: with a penalty so large that a penalised token cannot win,
  the first answer token may repeat a prompt token only without penalize_prompt, and tokens
  generated earlier are penalised either way."""
  params = model[1]
  batch = prompts(*[40] * 8, seed=2)
  plain = run(generator, params, batch, max_new=1,
              decoding=Decoding(greedy=True, repetition_penalty=1.0))
  echoes = [i for i, ids in enumerate(plain) if int(ids[0]) in batch[i].tolist()]
  assert echoes  # prompts whose unpenalised first token repeats one of their own tokens
  strong = dict(greedy=True, repetition_penalty=1e4)
  paper = run(generator, params, batch, max_new=8, decoding=Decoding(**strong))
  hf = run(generator, params, batch, max_new=8, decoding=Decoding(**strong, penalize_prompt=True))
  assert [int(ids[0]) for ids in paper] == [int(ids[0]) for ids in plain]
  for i in echoes:
    assert int(hf[i][0]) != int(plain[i][0]) and int(hf[i][0]) not in batch[i].tolist()
  for ids in paper + hf:  # generated tokens are penalised: none comes twice
    assert len(set(ids.tolist())) == len(ids)


def test_nucleus_from_candidates_equals_the_full_sort(monkeypatch):
  """Rows from peaked to flat over a 49,152-token vocabulary, in batches whose nucleus ends
  among the first 256 candidates, among 4,096, and past them (the full sort): the kept sets
  equal those of sorting every row whole."""
  rng = np.random.default_rng(0)
  scales = np.array([8.0, 5.0, 3.0, 2.0, 1.0, 0.3, 0.05, 4.0])[:, None]
  logits = jnp.asarray((rng.normal(size=(8, 49152)) * scales).astype(np.float32))
  batches = ([0, 1], [0, 1, 2, 7], list(range(8)))
  by_candidates = [np.isfinite(np.asarray(nucleus(logits[np.array(b)], 0.9))) for b in batches]
  monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", ())
  by_sort = np.isfinite(np.asarray(nucleus(logits, 0.9)))
  kept = by_sort.sum(-1)
  assert max(kept[:2]) < 256 < kept[7] < kept[2] < 4096 < kept[3], kept  # every path is taken
  for rows, got in zip(batches, by_candidates):
    np.testing.assert_array_equal(got, by_sort[np.array(rows)])
