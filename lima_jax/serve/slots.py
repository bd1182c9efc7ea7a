"""The compiled half of serving: B batch slots on one KV cache, a prefill that puts one request
into its slot, and one decode step that advances every active slot by a token.

Each slot holds its own conversation from cache position 0 (no left padding): a row's next token
is written at its own position, so rows of different lengths share a step, and a slot freed by a
finished row takes a new request while the others keep decoding (continuous batching). Each row
carries its own decoding settings (temperature, top_p, repetition penalty, greedy), its own key
and its own set of seen tokens; the token is picked by `lima_jax.decoding.next_tokens`, the very
function `generate` uses, so a served answer is what `generate` writes for the same prompt and
seed (row 0's key: fold_in(key(seed), 0), then fold_in(., step)).

A decode step reads every weight and the cache of the rows it runs, so it runs only the first
`rows` slots (a power of two covering the highest active slot; requests take the lowest free
slot) and attends only to the first `window` positions (a power of two covering the longest
row): one compile per (rows, window) pair used, and a lone client pays for one row, not B.
The step's rows run as one batch through the model; each row's last token stays on the device
between steps, so the engine can send a step before reading the previous one.

Log-probabilities are the model's own log-softmax, before penalty, temperature and top-p (what
vLLM returns by default): `TOP_K` of them per position come back with every token.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lima_jax import sharding
from lima_jax.decoding import decode_weights, next_tokens, prompt_bucket, prompt_seen

TOP_K = 20  # OpenAI's largest top_logprobs
_SETTINGS = ("temperature", "top_p", "repetition_penalty")
_MIN_WINDOW = 64


def _bucket(n: int, least: int) -> int:
  return max(least, 1 << (max(n, 1) - 1).bit_length())


def choose(logits, seen, keys, steps, settings: dict, greedy, all_greedy):
  """The next token of each row and the model's log-probabilities around it.

  logits [R, V] fp32; seen [R, V] bool; keys [R] (typed keys); steps [R] int32 (tokens the row
  has generated); settings {temperature, top_p, repetition_penalty} of [R] fp32; greedy [R]
  bool; all_greedy: a traced bool that skips the sampling (penalty, nucleus, draw) when no
  row samples. Returns (tokens [R] int32, their logprob [R], top logprobs [R, TOP_K] and
  their ids [R, TOP_K], seen with the tokens added).
  """
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  # A greedy row's temperature may be 0: it is never sampled, but must not make NaNs.
  sampling = dict(settings, temperature=jnp.where(greedy, 1.0, settings["temperature"]))
  sampling = {k: v[:, None] for k, v in sampling.items()}  # per row: [R, 1]
  pick = lambda is_greedy: next_tokens(logits, seen, keys, steps, sampling, is_greedy)
  arg_max = pick(True)
  tokens = jax.lax.cond(all_greedy, lambda: arg_max,
                        lambda: jnp.where(greedy, arg_max, pick(False)))
  seen = seen | jax.nn.one_hot(tokens, seen.shape[-1], dtype=jnp.bool_)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  top_values, top_ids = jax.lax.top_k(logprobs, TOP_K)
  return tokens, chosen, top_values, top_ids.astype(jnp.int32), seen


class SlotModel:
  """One model's compiled prefill and decode over `slots` rows of a cache of `capacity`
  positions. Device state: `cache` {'k', 'v'} [layers, slots, capacity + 1, kv_heads,
  head_dim] (the last column: the decode step's scratch), `seen` [slots, vocab] bool and
  `tokens` [slots] int32 (each row's last token); the engine keeps each slot's position."""

  def __init__(self, trainer, params, *, slots: int, context: int):
    cfg = trainer.model_cfg
    self.graphdef, self.slots, self.vocab = trainer.graphdef, slots, cfg.padded_vocab
    self.capacity = prompt_bucket(context)  # a prompt's bucket always fits
    dtype = jnp.dtype(cfg.compute_dtype)
    self.params = jax.jit(lambda p: decode_weights(p, dtype))(params)
    model = nnx.merge(self.graphdef, self.params)
    # Placed as the steps' outputs are, so the second call does not compile again.
    state = jax.jit(lambda: (model.init_cache(slots, self.capacity + 1),  # + decode's scratch
                             jnp.zeros((slots, self.vocab), jnp.bool_),
                             jnp.zeros((slots,), jnp.int32)),
                    out_shardings=sharding.replicated(trainer.mesh))
    # tokens: each row's last token, kept on the device so a step's input is the previous
    # step's output without a round trip through the host (the engine reads results a step late).
    self.cache, self.seen, self.tokens = state()
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("echo",),
                            donate_argnames=("cache", "seen", "last_tokens"))
    self._decode = jax.jit(self._decode_fn, static_argnames=("rows", "window"),
                           donate_argnames=("cache", "seen", "last_tokens"))

  def prefill(self, slot: int, ids: np.ndarray, key, settings: dict, greedy: bool, *,
              echo: bool):
    """Runs prompt `ids` (int32, 1 <= len < capacity) into `slot` and picks its first token
    (also kept on the device as the slot's next step input).

    Returns host arrays: (token, logprob, top values [TOP_K], top ids [TOP_K]) of the first
    new token, and with echo the prompt's own (logprob of ids[i] given ids[:i] for i >= 1
    [len - 1], top values [len - 1, TOP_K], top ids [len - 1, TOP_K]), else None.
    """
    length = len(ids)
    tokens = np.zeros((1, prompt_bucket(length)), np.int32)
    tokens[0, :length] = ids
    self.cache, self.seen, self.tokens, first, prompt = self._prefill(
        self.params, self.cache, self.seen, self.tokens, jnp.int32(slot), tokens, jnp.int32(length), key,
        _row_settings(settings), jnp.bool_(greedy), echo=echo)
    first = jax.device_get(first)
    first = tuple(x[0] for x in first)
    if prompt is None:
      return first, None
    return first, tuple(np.asarray(x)[:length - 1] for x in jax.device_get(prompt))

  def _prefill_fn(self, params, cache, seen, last_tokens, slot, tokens, length, key, settings, greedy, *,
                  echo):
    model = nnx.merge(self.graphdef, params)
    width = tokens.shape[1]
    valid = (jnp.arange(width) < length)[None]
    row_cache = model.init_cache(1, width)
    logits, row_cache = model.extend(tokens, jnp.arange(width)[None], row_cache, 0, valid)
    cache = {name: jax.lax.dynamic_update_slice(cache[name], row_cache[name], (0, slot, 0, 0, 0))
             for name in cache}
    row_seen = prompt_seen(tokens, valid, self.vocab, settings)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)
    row = {k: settings[k][None] for k in ("temperature", "top_p", "repetition_penalty")}
    *first, row_seen = choose(last, row_seen, key[None], jnp.zeros((1,), jnp.int32), row,
                              greedy[None], greedy)
    seen = jax.lax.dynamic_update_slice(seen, row_seen, (slot, 0))
    last_tokens = jax.lax.dynamic_update_slice(last_tokens, first[0], (slot,))
    prompt = None
    if echo:
      logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
      following = jnp.take_along_axis(logprobs, tokens[0, 1:, None], axis=-1)[:, 0]
      top_values, top_ids = jax.lax.top_k(logprobs, TOP_K)
      prompt = (following, top_values, top_ids)
    return cache, seen, last_tokens, tuple(first), prompt

  def step(self, positions, steps, rows_state) -> tuple:
    """Dispatches one token for every row up to the highest active one and returns at once
    (jax runs it asynchronously): device arrays (tokens, logprob, top values, top ids), one row
    per slot run; `jax.device_get` them later. positions: host int32 [slots], where each row's
    last token goes in the cache, -1 for a row not run; steps: host int32 [slots], tokens the
    row has generated; rows_state: `RowState`, the rows' keys and decoding settings. A row
    not run gets garbage in its own slot only (its next prefill overwrites it)."""
    active = np.flatnonzero(positions >= 0)
    rows = _bucket(int(active.max()) + 1, 1) if len(active) else 1
    positions = np.maximum(positions[:rows], 0)
    window = min(self.capacity, _bucket(int(positions.max()) + 1, _MIN_WINDOW))  # > positions
    keys, settings, greedy = rows_state.on_device(rows)
    self.cache, self.seen, self.tokens, out = self._decode(
        self.params, self.cache, self.seen, self.tokens, positions, keys,
        steps[:rows].astype(np.int32), settings, greedy, rows=rows, window=window)
    return out

  def _decode_fn(self, params, cache, seen, last_tokens, positions, keys, steps, settings, greedy,
                 *, rows, window):
    model = nnx.merge(self.graphdef, params)
    tokens = last_tokens[:rows]
    # One batched call for all rows. The model writes a call's keys and values at one cache
    # index for every row, but each row's token belongs at its own position: the call writes
    # them at scratch column `window` (past every row's position; the cache has a spare column
    # so it exists), each row attends to its own slots before its position and the scratch,
    # then each row's scratch is copied to its position.
    width = window + 1
    part = {name: c[:, :rows, :width] for name, c in cache.items()}
    slots = jnp.arange(width)[None]
    valid = (slots < positions[:, None]) | (slots == window)
    logits, part = model.extend(tokens[:, None], positions[:, None], part, window, valid)
    logits = logits[:, 0]
    cache = {name: c.at[:, jnp.arange(rows), positions].set(part[name][:, :, window])
             for name, c in cache.items()}
    *out, row_seen = choose(logits, seen[:rows], keys, steps, settings, greedy, jnp.all(greedy))
    return cache, seen.at[:rows].set(row_seen), last_tokens.at[:rows].set(out[0]), tuple(out)


class RowState:
  """Each slot's key and decoding settings (temperature, top_p, repetition_penalty, greedy):
  host arrays set when a request takes the slot, uploaded once per change rather than every
  step."""

  def __init__(self, slots: int):
    self.settings = {k: np.ones(slots, np.float32) for k in _SETTINGS}
    self.greedy = np.zeros(slots, np.bool_)
    self.keys = jax.vmap(request_key)(np.zeros(slots, np.int32))
    self._uploaded = {}  # rows -> (keys, settings, greedy) on the device

  def set(self, slot: int, key, settings: dict, greedy: bool) -> None:
    for name in _SETTINGS:
      self.settings[name][slot] = settings[name]
    self.greedy[slot] = greedy
    self.keys = self.keys.at[slot].set(key)
    self._uploaded.clear()

  def on_device(self, rows: int) -> tuple:
    if rows not in self._uploaded:
      self._uploaded[rows] = (
          self.keys[:rows], {k: jnp.asarray(v[:rows]) for k, v in self.settings.items()},
          jnp.asarray(self.greedy[:rows]))
    return self._uploaded[rows]


def _row_settings(settings: dict) -> dict:
  return {k: jnp.float32(settings[k]) for k in ("temperature", "top_p", "repetition_penalty")} | {
      "penalize_prompt": jnp.bool_(settings["penalize_prompt"])}


def request_key(seed: int):
  """A request's key: `generate`'s key for the first prompt of a file (row 0)."""
  return jax.random.fold_in(jax.random.key(seed), 0)
