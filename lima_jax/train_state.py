"""The train state on the mesh, and the compiled train and eval steps.

The state is a plain pytree, {'step', 'params', 'opt_state'}, with params as a pure dict (the form
checkpoints and weight converters use). It is created already sharded by a jitted init, so a big
model never exists whole on one host. The train step is `jax.jit` with explicit in/out shardings
and a donated state.

What trains is `trained` (`lima_jax.trained.Trained`): every param, or with LoRA the adapters
and the rows of the tokens the run adds, the base frozen. Gradients and the optimizer state
exist for that part alone, and a checkpoint (`checkpointed`) holds only it, the optimizer state
and the step: the frozen base is reloaded from where it came from (`with_base`).

A batch is [micro_batches, rows, length] (`lima_jax.data.StepLayout`). The steps loop over the
micro-batches that hold tokens and sum their losses and gradients, each scaled by the whole
step's token count, so the update equals the one over all rows at once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lima_jax import lora, optim, sharding
from lima_jax.model import Llama, LlamaConfig
from lima_jax.trained import Trained

BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions")


def token_loss(model, batch, *, dropout_key=None, constrain=None, chunk_tokens: int = 0):
  """Summed cross entropy over the weighted target tokens, and their count.

  chunk_tokens > 0 (train.loss_chunk_tokens) computes the final norm, LM head and cross entropy
  for that many sequence positions of every row at a time, recomputing them in the backward
  pass, so the [rows, length, padded_vocab] fp32 logits never exist whole (LLaMA-3's 128,256
  columns make one 8,192-token row's logits 4 GiB). The sums are those of the unchunked loss up
  to fp32 rounding. Peers do the same: Levanter's blockwise cross entropy, MaxText's vocabulary
  tiling.
  """
  kwargs = {} if constrain is None else {"constrain": constrain}
  hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"],
                        dropout_key=dropout_key, **kwargs)
  length = hidden.shape[1]
  if not 0 < chunk_tokens < length:
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), batch["targets"])
    return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"])
  return _chunked_loss(model, hidden, batch, chunk_tokens), jnp.sum(batch["weights"])


def _chunked_loss(model, hidden, batch, chunk: int):
  """token_loss's sum, `chunk` positions at a time: a scan over [chunks, rows, chunk] slices
  whose body is rematerialised, so only one chunk's logits are live, forward or backward."""
  rows, length, _ = hidden.shape
  chunks = -(-length // chunk)
  pad = chunks * chunk - length  # zero-weight positions past the end

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(rows, chunks, chunk, *x.shape[2:]), 0, 1)

  head_def, head_state = nnx.split(model)

  @jax.checkpoint
  def chunk_loss(state, x, targets, weights):
    logits = nnx.merge(head_def, state).logits(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights)

  def body(total, xs):
    return total + chunk_loss(head_state, *xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (split(hidden), split(batch["targets"]), split(batch["weights"])))
  return total


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one (model, optimizer, mesh): init, train step, eval step."""
  model_cfg: LlamaConfig
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  seed: int
  loss_chunk_tokens: int = 0  # train.loss_chunk_tokens: see token_loss
  # What trains (None: every param, or with LoRA the adapters alone): `Trained.of_run` for a new
  # run, `Trained.recorded` for a run's checkpoints.
  trained: Trained | None = None

  def __post_init__(self):
    if self.trained is None:
      self.trained = Trained(lora=self.uses_lora)
    if self.trained.lora != self.uses_lora:
      raise ValueError(f"{self.trained} does not match lora_rank {self.model_cfg.lora_rank}")
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: Llama(self.model_cfg, nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    names = sharding.logical_names(abstract_params)
    shapes = jax.eval_shape(self._init, 0)
    sharding.check_divisible(shapes["params"], names, self.mesh)
    param_shardings = sharding.param_shardings(names, self.mesh)
    replicated = sharding.replicated(self.mesh)
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, shapes["opt_state"], self.trainable(param_shardings),
        transform_non_params=lambda _: replicated)
    self.state_shardings = {"step": replicated, "params": param_shardings,
                            "opt_state": opt_shardings}
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.state_shardings)
    self.batch_sharding = sharding.micro_batch_sharding(self.mesh)
    batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
    self._constrain = sharding.Constrainer(self.mesh)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    # Only the adapters of a fresh init (XLA drops the unused base draws): for a pretrained base.
    self.init_adapters = jax.jit(lambda seed: lora.adapters(self._init(seed)["params"]),
                                 out_shardings=lora.adapters(param_shardings))
    self.train_step = jax.jit(self._train_step, donate_argnums=0,
                              in_shardings=(self.state_shardings, batch_shardings),
                              out_shardings=(self.state_shardings, replicated))
    self.eval_step = jax.jit(self._eval_step,
                             in_shardings=(param_shardings, batch_shardings),
                             out_shardings=replicated)

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))

  @property
  def num_trainable(self) -> int:
    """Params that train: all of them, or with LoRA the adapters' and the token rows' elements."""
    return sum(x.size for x in jax.tree.leaves(self.trainable(self.abstract_state["params"])))

  @property
  def uses_lora(self) -> bool:
    return self.model_cfg.lora_rank > 0

  def trainable(self, params):
    """The part of a param tree (or of a tree shaped like it) that trains (`Trained.part`)."""
    return self.trained.part(params)

  def frozen(self, params):
    """The base model's params of a param tree, all but the adapters (`Trained.rest`)."""
    return self.trained.rest(params)

  def joined(self, frozen, trainable):
    """The param tree of a frozen rest and a trained part (`Trained.join`)."""
    return self.trained.join(frozen, trainable)

  def _with_trainable(self, params, trainable):
    return self.joined(self.frozen(params), trainable)

  def _init(self, seed):
    with nnx.use_eager_sharding(False):
      model = Llama(self.model_cfg, nnx.Rngs(jax.random.key(seed)))
    params = self.trained.tables_in_fp32(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if self.model_cfg.vocab_size < self.model_cfg.padded_vocab:
      params = _zero_padding_rows(params, self.model_cfg)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.optimizer.init(self.trainable(params))}

  def state_from(self, base_params) -> dict:
    """A fresh state (step 0, a fresh optimizer) around pretrained params placed on the mesh:
    the whole model, or with LoRA the frozen base (its token rows as loaded), to which fresh
    adapters are added."""
    params = base_params
    if self.uses_lora:
      params = self.joined(base_params, self.init_adapters(self.seed))
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt_state"])(
        self.trainable(params))
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}

  def checkpointed(self, state):
    """What a checkpoint holds of a state (or of `abstract_state`): all of it, or with LoRA the
    step, the trained part (as 'params') and its optimizer state; the base is not written."""
    return dict(state, params=self.trainable(state["params"]))

  def with_base(self, restored, fresh):
    """The state of a checkpoint restored as `checkpointed` left it, its base params taken from
    `fresh` (a state built like the run's first one); without LoRA, `restored` itself."""
    if not self.uses_lora:
      return restored
    return dict(restored, params=self.joined(self.frozen(fresh["params"]), restored["params"]))

  def model(self, params) -> Llama:
    return nnx.merge(self.graphdef, params)

  def _train_step(self, state, batch):
    # Dropout randomness is a function of (seed, step, micro-batch) alone, so a resumed run
    # repeats it exactly; the model folds in the layer index.
    step_key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
    # The mean over the step's target tokens; a step with none (impossible in practice) is 0.
    count = jnp.sum(batch["weights"])
    scale = 1.0 / jnp.maximum(count, 1.0)

    trainable = self.trainable(state["params"])  # with LoRA the base stays frozen

    def micro_loss_and_grads(micro, index):
      def loss_fn(trainable):
        total, _ = token_loss(self.model(self._with_trainable(state["params"], trainable)), micro,
                              dropout_key=jax.random.fold_in(step_key, index),
                              constrain=self._constrain, chunk_tokens=self.loss_chunk_tokens)
        return total * scale
      return jax.value_and_grad(loss_fn)(trainable)

    def zeros():  # the accumulator, laid out like the params it sums gradients for
      return jnp.zeros((), jnp.float32), jax.lax.with_sharding_constraint(
          jax.tree.map(jnp.zeros_like, trainable),
          self.trainable(self.state_shardings["params"]))

    loss, grads = _sum_over_micro_batches(micro_loss_and_grads, batch, zeros)
    grad_norm = optax.tree.norm(grads)

    # The LR follows the step counter, not optax's (which a skipped update leaves behind).
    lr = self.schedule(state["step"])

    def update(_):
      updates, opt_state = self.optimizer.update(
          grads, optim.set_learning_rate(state["opt_state"], lr), trainable)
      trained = optax.apply_updates(trainable, updates)
      return self._with_trainable(state["params"], trained), opt_state

    # A non-finite loss or gradient leaves params and optimizer state as they were (a cond,
    # not a select, so no second copy of the state is live); the host decides whether to stop
    # (train.max_bad_steps). The step still advances: data order and schedule follow the step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.lax.cond(
        finite, update, lambda _: (state["params"], state["opt_state"]), None)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
               "tokens": count}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def _eval_step(self, params, batch):
    model = self.model(params)

    def micro_sums(micro, index):
      del index
      total, count = token_loss(model, micro, constrain=self._constrain,
                                chunk_tokens=self.loss_chunk_tokens)
      return {"loss_sum": total, "tokens": count}

    zero = jnp.zeros((), jnp.float32)
    return _sum_over_micro_batches(micro_sums, batch, lambda: {"loss_sum": zero, "tokens": zero})

  def put_batch(self, batch: dict) -> dict:
    """Host numpy batch (the global step, [micro_batches, rows, length]) -> global arrays; each
    process feeds its own rows of every micro-batch."""
    out = {}
    for key in BATCH_KEYS:
      rows = _process_rows(self.batch_sharding, batch[key].shape)
      out[key] = jax.make_array_from_process_local_data(
          self.batch_sharding, batch[key][:, rows], batch[key].shape)
    return out


def _zero_padding_rows(params, cfg: LlamaConfig):
  """The vocabulary padding rows never produce or receive a token: keep them at zero."""
  real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
  params = dict(params)
  params["embed"] = jnp.where(real[:, None], params["embed"], 0)
  if "lm_head" in params:
    params["lm_head"] = jnp.where(real[None, :], params["lm_head"], 0)
  return params


def _sum_over_micro_batches(fn, batch, zeros):
  """The sum of fn(micro_batch, index) over the micro-batches that hold tokens; zeros() builds
  the accumulator, only when there is more than one micro-batch.

  They come first (rows fill in order), so a loop with a traced trip count skips the padding
  ones: a short step computes fewer micro-batches than the longest, in one compiled program.
  """
  micro_batches = batch["tokens"].shape[0]

  def take(i):
    return jax.tree.map(lambda x: x[i], batch)

  if micro_batches == 1:  # no loop, and no accumulator beside the gradients
    return fn(take(0), 0)
  used = jnp.sum(jnp.any(batch["segment_ids"] > 0, axis=(1, 2)))
  return jax.lax.fori_loop(
      0, used, lambda i, acc: jax.tree.map(jnp.add, acc, fn(take(i), i)), zeros())


def _process_rows(batch_sharding, shape) -> slice:
  """The contiguous rows of every micro-batch that this process's devices hold."""
  index_map = batch_sharding.addressable_devices_indices_map(shape)
  starts = [idx[1].start or 0 for idx in index_map.values()]
  stops = [shape[1] if idx[1].stop is None else idx[1].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))
