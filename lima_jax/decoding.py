"""Sampling with the paper's decoding, compiled: a prefill, then a KV-cache decode loop.

A batch of prompts is left-padded to one static length, so every row writes its next token to
the same cache slot; each row keeps its own positions and a mask of the slots it really holds.
The whole generation (prefill, the decode loop, stopping at any of the stop ids:
`ChatTokenizer.stop_ids`, EOT and the model's own end ids) is one jitted function on the training
mesh, compiled once per (batch, prompt bucket, max_new, greedy).

Decoding follows LIMA: CTRL's repetition penalty on every token generated so far (the paper's
"previously generated tokens"; with penalize_prompt, on the prompt's tokens too, as
transformers' RepetitionPenaltyLogitsProcessor does), then temperature, then nucleus (top-p)
sampling; greedy takes the arg max after the penalty. Each prompt draws from its own key,
folded from the seed and its index in the list, so its sample does not depend on the batch size.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lima_jax import sharding

CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "head_dim")
_MIN_BUCKET = 16  # prompt lengths round up to a power of two from here: few compiles


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How to pick each token; the defaults are the paper's."""
  temperature: float = 0.7
  top_p: float = 0.9
  repetition_penalty: float = 1.2
  greedy: bool = False
  seed: int = 0
  # The paper penalises "previously generated tokens". Penalising the prompt too (transformers'
  # reading) pushed a real instruct model's answers away from the prompt's words: all 6 samples
  # for "What is the capital of France?" opened in French.
  penalize_prompt: bool = False

  @classmethod
  def from_config(cls, section) -> "Decoding":
    """From a config's `generate` section (a ConfigDict or the dict saved with a checkpoint)."""
    return cls(**{f.name: section.get(f.name, f.default) for f in dataclasses.fields(cls)})

  def settings(self) -> dict:
    """The traced part: changing it does not recompile."""
    return {"temperature": jnp.float32(self.temperature), "top_p": jnp.float32(self.top_p),
            "repetition_penalty": jnp.float32(self.repetition_penalty),
            "penalize_prompt": jnp.bool_(self.penalize_prompt), "seed": jnp.int32(self.seed)}


def penalize_repetition(logits, seen, penalty):
  """CTRL: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)


# The nucleus is looked for among this many likeliest tokens, then this many, before a full sort.
NUCLEUS_CANDIDATES = (256, 4096)


def nucleus(logits, top_p):
  """Keeps the most likely tokens whose probabilities first reach top_p (at least one).

  logits [B, V]; top_p a scalar or [B, 1]. The nucleus is looked for among the likeliest
  NUCLEUS_CANDIDATES tokens (a top-k: 3 ms for 16 rows of SmolLM2's 49,152 tokens on this
  project's CPU, where sorting the vocabulary took 340 ms); only when some row's candidates do
  not reach top_p are more taken, and at last the whole vocabulary sorted. The kept set is the
  same either way: the probabilities are the full softmax's, summed from the likeliest down.
  """
  log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

  def threshold(ordered):  # ordered: the likeliest logits, in decreasing order
    probs = jnp.exp(ordered - log_total)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    return jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1), kept

  def search(tiers):
    if not tiers or tiers[0] >= logits.shape[-1]:
      return threshold(jnp.sort(logits, axis=-1)[..., ::-1])[0]
    found, kept = threshold(jax.lax.top_k(logits, tiers[0])[0])
    # kept < candidates: a candidate already has top_p of mass before it; the nucleus ends there.
    return jax.lax.cond(jnp.all(kept < tiers[0]), lambda: found, lambda: search(tiers[1:]))

  return jnp.where(logits >= search(NUCLEUS_CANDIDATES), logits, -jnp.inf)


def prompt_seen(prompt, real, vocab: int, settings: dict):
  """[B, V] bool: the tokens penalised before the first new token. prompt [B, T] int32, real
  [B, T] bool (False on padding); all of the prompt's tokens with penalize_prompt, none without."""
  rows = jnp.arange(prompt.shape[0])[:, None]
  counted = (real & settings["penalize_prompt"]).astype(jnp.int32)
  return jnp.zeros((prompt.shape[0], vocab), jnp.int32).at[rows, prompt].add(counted) > 0


def sampling_logits(logits, seen, settings: dict):
  """The logits [B, V] a token is drawn from: penalty, then temperature, then nucleus (-inf
  outside it), the order of transformers' RepetitionPenalty, Temperature and TopP processors."""
  logits = penalize_repetition(logits, seen, settings["repetition_penalty"])
  return nucleus(logits / settings["temperature"], settings["top_p"])


def next_tokens(logits, seen, keys, step, settings: dict, greedy: bool):
  """One token per row from logits [B, V]; `seen` [B, V] marks the tokens to penalize; keys [B];
  step: the tokens generated so far, a scalar or [B] (each row's key is folded with it);
  settings: scalars, or [B, 1] for per-row settings."""
  if greedy:
    logits = penalize_repetition(logits, seen, settings["repetition_penalty"])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = sampling_logits(logits, seen, settings)
  draw = lambda key, row_step, row: jax.random.categorical(jax.random.fold_in(key, row_step), row)
  steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape)
  return jax.vmap(draw)(keys, steps, logits).astype(jnp.int32)


def sample_loop(step_fn: Callable, state, logits, prompt, real, limits, row_ids, settings, *,
                max_new: int, greedy: bool, stop_ids: Sequence[int]):
  """The decode loop shared by the cached and the full-forward paths.

  logits [B, V]: the prediction after each prompt; step_fn(state, tokens, i) feeds the tokens
  chosen at step i - 1 and returns the next logits and state. A row stops after any of
  `stop_ids` or after limits[row] tokens. Returns [B, max_new] ids, -1 after a row's end, and
  the steps taken.
  """
  stops = jnp.asarray(stop_ids, jnp.int32)
  batch, vocab = logits.shape
  seen = prompt_seen(prompt, real, vocab, settings)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(settings["seed"]), r))(row_ids)

  def emit(i, logits, seen, out, done):
    tokens = jnp.where(done, -1, next_tokens(logits, seen, keys, i, settings, greedy))
    seen = seen | jax.nn.one_hot(tokens, vocab, dtype=jnp.bool_)  # -1 adds nothing
    done = done | jnp.isin(tokens, stops) | (i + 1 >= limits)
    return tokens, seen, out.at[:, i].set(tokens), done

  out = jnp.full((batch, max_new), -1, jnp.int32)
  tokens, seen, out, done = emit(0, logits, seen, out, limits <= 0)

  def body(carry):
    i, state, tokens, seen, out, done = carry
    logits, state = step_fn(state, jnp.maximum(tokens, 0), i)
    return (i + 1, state) + emit(i, logits, seen, out, done)

  carry = (jnp.int32(1), state, tokens, seen, out, done)
  steps, _, _, _, out, _ = jax.lax.while_loop(
      lambda c: (c[0] < max_new) & ~jnp.all(c[-1]), body, carry)
  return out, steps


def prompt_bucket(length: int) -> int:
  return max(_MIN_BUCKET, 1 << (length - 1).bit_length())


def decode_weights(params, compute_dtype):
  """The params as the decode loop reads them: every weight in the compute dtype, cast once
  before the loop (a decode step is bound by the bytes it reads: bf16 halves fp32's), and the
  RMSNorm scales as stored. The model casts each weight to the compute dtype where it uses it
  and the scales to fp32, so the tokens are the same."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if getattr(path[-1], "key", None) == "scale" else x.astype(compute_dtype),
      params)


class Generator:
  """Batched generation for one model on the training mesh (a `Trainer`'s graphdef and mesh)."""

  def __init__(self, trainer, stop_ids: int | Sequence[int], batch_size: int):
    """stop_ids: the ids a row stops at (`ChatTokenizer.stop_ids`; one id is taken too)."""
    self.graphdef, self.mesh = trainer.graphdef, trainer.mesh
    self.stop_ids = tuple(int(i) for i in np.atleast_1d(stop_ids))
    self.compute_dtype = jnp.dtype(trainer.model_cfg.compute_dtype)
    ways = sharding.batch_ways(self.mesh)
    self.batch_size = -(-batch_size // ways) * ways  # whole rows on every batch shard
    self._constrain = sharding.Constrainer(self.mesh)
    self._rows = NamedSharding(self.mesh, sharding.spec_of(("batch",)))
    replicated = sharding.replicated(self.mesh)
    self._cached = jax.jit(self._generate, static_argnames=("max_new", "greedy"),
                           out_shardings=(replicated, replicated))
    self._full = jax.jit(self._generate_by_full_forward, static_argnames=("max_new", "greedy"),
                         out_shardings=(replicated, replicated))

  def generate(self, params, prompts: Sequence[np.ndarray], *, max_new: int, context: int,
               decoding: Decoding, on_batch: Callable[[int], None] | None = None,
               use_cache: bool = True) -> list[np.ndarray]:
    """Generated ids per prompt, ending with the stop id when the model stopped by itself.

    A row stops at a stop id, after max_new tokens, or when prompt + generation fill `context`
    (every prompt must be shorter than it). use_cache=False recomputes the whole prefix for
    every token: the reference the cache is checked and benchmarked against.
    """
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1 or max(lengths) >= context:
      raise ValueError(f"prompt lengths must be in [1, {context}), got {lengths}")
    prompt_len = prompt_bucket(max(lengths))
    max_new = max(1, min(max_new, context - min(lengths)))
    run = self._cached if use_cache else self._full
    results = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      inputs = self._batch(chunk, start, prompt_len, max_new, context, left=use_cache)
      out, _ = run(params, *inputs, decoding.settings(), max_new=max_new, greedy=decoding.greedy)
      out = np.asarray(jax.device_get(out))
      results += [row[:np.argmax(row < 0)] if (row < 0).any() else row for row in out[:len(chunk)]]
      if on_batch:
        on_batch(len(chunk))
    return results

  def _batch(self, chunk, first_row, prompt_len, max_new, context, left):
    """Host arrays of one batch, padded to full size; filler rows have a limit of 0 tokens."""
    tokens = np.zeros((self.batch_size, prompt_len), np.int32)
    lengths = np.ones(self.batch_size, np.int32)
    limits = np.zeros(self.batch_size, np.int32)
    for row, ids in enumerate(chunk):
      lengths[row] = len(ids)
      if left:
        tokens[row, prompt_len - len(ids):] = ids
      else:
        tokens[row, :len(ids)] = ids
      limits[row] = min(max_new, context - len(ids))
    row_ids = first_row + np.arange(self.batch_size, dtype=np.int32)
    put = lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index])
    return (put(tokens, sharding.batch_sharding(self.mesh)), put(lengths, self._rows),
            put(limits, self._rows), put(row_ids, self._rows))

  def _generate(self, params, tokens, lengths, limits, row_ids, settings, *, max_new, greedy):
    model = nnx.merge(self.graphdef, decode_weights(params, self.compute_dtype))
    batch, prompt_len = tokens.shape
    pad = prompt_len - lengths
    slot_valid = jnp.arange(prompt_len + max_new)[None, :] >= pad[:, None]
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad[:, None], 0)
    cache = jax.tree.map(lambda c: self._constrain(c, CACHE_NAMES),
                         model.init_cache(batch, prompt_len + max_new))
    logits, cache = model.extend(tokens, positions, cache, 0, slot_valid,
                                 constrain=self._constrain)

    def step(cache, chosen, i):
      logits, cache = model.extend(chosen[:, None], (lengths + i - 1)[:, None], cache,
                                   prompt_len + i - 1, slot_valid, constrain=self._constrain)
      return logits[:, 0], cache

    return sample_loop(step, cache, logits[:, -1], tokens, slot_valid[:, :prompt_len], limits,
                       row_ids, settings, max_new=max_new, greedy=greedy,
                       stop_ids=self.stop_ids)

  def _generate_by_full_forward(self, params, tokens, lengths, limits, row_ids, settings, *,
                                max_new, greedy):
    """No cache: every step runs the training forward over the whole right-padded buffer."""
    model = nnx.merge(self.graphdef, params)
    batch, prompt_len = tokens.shape
    rows = jnp.arange(batch)
    slots = jnp.arange(prompt_len + max_new)
    positions = jnp.broadcast_to(slots, (batch, len(slots)))

    def logits_at(buffer, filled):
      segment_ids = (slots[None, :] < filled[:, None]).astype(jnp.int32)
      logits = model(buffer, positions, segment_ids, constrain=self._constrain)
      return logits[rows, filled - 1]

    def step(buffer, chosen, i):
      buffer = buffer.at[rows, lengths + i - 1].set(chosen)
      return logits_at(buffer, lengths + i), buffer

    buffer = jnp.pad(tokens, ((0, 0), (0, max_new)))
    real = slots[None, :prompt_len] < lengths[:, None]
    return sample_loop(step, buffer, logits_at(buffer, lengths), tokens, real, limits, row_ids,
                       settings, max_new=max_new, greedy=greedy, stop_ids=self.stop_ids)
