"""`make_private`: masked DP-SGD as the train step of a Keras model.

A Keras 3 optimizer never sees the loss, so DP lives in the model:
`tdp.make_private(model, ...)` returns a private model whose `fit`,
`train_on_batch` and `evaluate` work as usual, and whose train step is one
masked DP-SGD step (`tfdpprune.core.dp_step`): per-example losses from the
compiled (standard) Keras loss, per-example gradients of the selected
coordinates clipped jointly to C, summed, Gaussian noise sigma*C added once
on the selected coordinates, divided by `expected_batch_size`, and applied
by the compiled optimizer (any optimizer of the model's Keras), with every
unselected coordinate and its optimizer state kept still (`masked_apply`).
The same step runs on Keras 2 (`tf_keras`) models.

State: the DP step count (`iterations`) and the masks are variables of the
model, so `.keras` files and `tf.train.Checkpoint` carry them; the
mechanism's parameters are in its config. The noise key is drawn from OS
entropy when the model is built or loaded (or from `noise_seed`) and held
outside Keras' and TensorFlow's tracking: no checkpoint, SavedModel or
`.keras` file holds it.

`PrivateModelMixin` is the step; `tfdpprune.keras3.private.PrivateModel`
and `tfdpprune.keras2.private.PrivateModel` mix it with their Keras'
`Model` and give the few front-end pieces (the step counter's weight, the
optimizer's slots and update, the loss metric).
"""

from typing import Optional, Sequence

from absl import logging

from tfdpprune import frontends
from tfdpprune.core import dp_step
from tfdpprune.core import mechanism as mechanism_lib
from tfdpprune.core import randomness
from tfdpprune.core import validation
from tfdpprune.core import variables as variables_lib
from tfdpprune.core._tf import tf


class Secret:
  """Holds the noise key's variable out of Keras' and TensorFlow's tracking
  (a plain object: neither tracks what it holds)."""

  def __init__(self, variable):
    self.variable = variable


# The fixed loss scale of float16 compute (mixed_float16): a public constant.
# A dynamic scale, which shrinks when gradients overflow, would depend on the
# private data; a float16 example that still overflows gets coefficient 0
# (its norm is not finite), and no step is ever skipped.
FLOAT16_LOSS_SCALE = 2.0 ** 10


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def masked_apply(apply, slots, grads: Sequence[tf.Tensor],
                 variables: Sequence[object], masks: Sequence[object],
                 excluded: Sequence[bool], who: str = "the optimizer") -> None:
  """`apply(grads, variables)` with unselected coordinates kept still.

  Variables whose mask is all zero (`excluded`) are left out of the update;
  for partially masked ones the variable and its optimizer state
  (`slots(var)`) are saved, the optimizer is applied, and the unselected
  coordinates are put back, so neither the value nor the optimizer state
  (momentum, moments, weight decay, weight averages) of an unselected
  coordinate moves, whatever the optimizer.

  Raises:
    ValueError: an optimizer keeps state of another shape than a masked
      variable (factored moments), which cannot be kept per coordinate.
  """
  pairs = [(g, v) for g, v, skip in zip(grads, variables, excluded)
           if not skip]
  kept = []
  for var, mask, skip in zip(variables, masks, excluded):
    if skip or mask is None:
      continue
    state = [var] + list(slots(var))
    for s in state:
      if tuple(s.shape) != tuple(var.shape):
        raise ValueError(
            f"{who} keeps state of shape {tuple(s.shape)} for variable "
            f"{variables_lib.name(var)} of shape {tuple(var.shape)} "
            "(factored moments), so it cannot keep unselected coordinates "
            "still; use another optimizer (SGD, Adam, AdamW, Lion, ...) with "
            "masks, or select whole variables")
    selected = tf.cast(mask, tf.bool)
    kept.append((selected, [(s, tf.identity(s)) for s in state]))
  if not pairs:
    return
  with tf.control_dependencies([old for _, saved in kept
                                for _, old in saved]):
    apply([g for g, _ in pairs], [v for _, v in pairs])
  for selected, saved in kept:
    for s, old in saved:
      s.assign(tf.where(selected, s, old))


class PrivateModelMixin:
  """A model whose train step is masked DP-SGD (see the module).

  Args:
    model: the (wrapped, `tdp.prune`) model; its layers and variables are
      this model's.
    l2_norm_clip: C > 0.
    noise_multiplier: sigma >= 0.
    expected_batch_size: B > 0, the denominator of every step (Poisson
      batches vary in size; their realized size is private).
    noise_seed: None (secret noise) or an integer (reproducible, public
      noise: experiments only; then part of the config).
    augmentation_multiplicity: K >= 1 rows per example (De et al. 2022).
    physical_batch_size: None, or P >= 1: each logical (Poisson) batch is
      processed in chunks of at most P examples inside the one training step
      (forward, backward and per-example work), their clipped sums
      accumulated in float32, noise added once and the total divided by B:
      the same mechanism as the unsplit step, with memory bounded by P.
    iterations: the initial DP step count (restored from a `.keras` file).
  """

  _warned_fallback = False

  def __init__(self, model, *, l2_norm_clip: float, noise_multiplier: float,
               expected_batch_size: float, noise_seed: Optional[int] = None,
               augmentation_multiplicity: int = 1,
               physical_batch_size: Optional[int] = None, iterations: int = 0,
               **kwargs):
    kwargs.setdefault("name", f"private_{model.name}")
    super().__init__(**kwargs)
    if expected_batch_size is None:
      raise ValueError(
          "expected_batch_size=None: the DP step divides by the expected "
          "batch size B (the realized size of a Poisson batch is private); "
          "give B = the batch_size of tdp.poisson_dataset")
    _check_int("augmentation_multiplicity", augmentation_multiplicity, 1)
    _check_int("iterations", iterations, 0)
    if physical_batch_size is not None:
      _check_int("physical_batch_size", physical_batch_size, 1)
    if noise_seed is not None:
      _check_int("noise_seed", noise_seed, -2**63)
    object.__setattr__(self, "_mechanism", mechanism_lib.Mechanism(
        float(l2_norm_clip), float(noise_multiplier),
        float(expected_batch_size)))
    object.__setattr__(self, "_noise_seed", noise_seed)
    object.__setattr__(self, "_augmentation_multiplicity",
                       int(augmentation_multiplicity))
    object.__setattr__(self, "_physical_batch_size", physical_batch_size)
    self.model = model
    self._iterations = self._step_counter(int(iterations))
    if model.built:  # its call builds nothing new
      self.built = True
    with tf.init_scope():
      object.__setattr__(self, "_secret", Secret(tf.Variable(
          randomness.private_key(randomness.NOISE, noise_seed),
          dtype=tf.int64, trainable=False, name="noise_key")))

  # -- mixed precision -----------------------------------------------------------

  @property
  def base_optimizer(self):
    """The optimizer that applies the DP gradient: the compiled one, or the
    inner one of a `LossScaleOptimizer` (whose dynamic scale, a function of
    which gradients overflowed, is never consulted or moved)."""
    return getattr(self.optimizer, "inner_optimizer", self.optimizer)

  def _loss_scale(self) -> float:
    """S: `FLOAT16_LOSS_SCALE` when the model computes in float16, else 1
    (bfloat16 has float32's range)."""
    dtype = getattr(self.model, "compute_dtype", "float32")
    return FLOAT16_LOSS_SCALE if str(dtype) == "float16" else 1.0

  # -- what the front end gives ---------------------------------------------

  def _step_counter(self, initial: int):
    """A non-trainable int64 scalar weight of the model."""
    raise NotImplementedError

  def _slots(self, var):
    """The optimizer's per-variable state of `var`."""
    raise NotImplementedError

  def _apply(self, grads, variables):
    """Applies the compiled optimizer."""
    raise NotImplementedError

  def _track_loss(self, x, y, y_pred, sample_weight, rows):
    """Updates the `loss` and compiled metrics with one batch (or chunk)."""
    raise NotImplementedError

  def _check_optimizer(self):
    """Refuses an optimizer setting that would change the mechanism."""

  # -- the mechanism's public parameters ----------------------------------------

  @property
  def l2_norm_clip(self) -> float:
    return self._mechanism.l2_norm_clip

  @property
  def noise_multiplier(self) -> float:
    return self._mechanism.noise_multiplier

  @property
  def expected_batch_size(self) -> float:
    return self._mechanism.expected_batch_size

  @property
  def augmentation_multiplicity(self) -> int:
    return self._augmentation_multiplicity

  @property
  def noise_seed(self) -> Optional[int]:
    return self._noise_seed

  @property
  def physical_batch_size(self) -> Optional[int]:
    """P, the most examples processed at once (None: the whole batch)."""
    return self._physical_batch_size

  @property
  def iterations(self):
    """The number of DP steps taken (a variable: saved and restored)."""
    return self._iterations

  @property
  def private_model_of(self):
    """The wrapped model inside (what `tdp.strip` strips)."""
    return self.model

  # -- Keras ----------------------------------------------------------------

  def call(self, inputs, training=None):
    return self.model(inputs, training=training)

  def per_example_losses(self, y, y_pred, sample_weight=None):
    """`[rows]` per-example losses of the compiled loss, unreduced (means
    over any non-batch axes, times the sample weights)."""
    keras = frontends.of(self).keras
    loss = self.loss
    if isinstance(loss, (list, tuple, dict)):
      raise ValueError(
          "a private model takes one loss on one output; got a "
          f"{type(loss).__name__} of losses. Combine them in one loss "
          "function of the outputs.")
    if isinstance(loss, str):
      loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
      values = loss.call(y, y_pred)
    else:
      values = loss(y, y_pred)
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
      raise ValueError(
          f"the loss {loss!r} returns one value for the batch, but DP-SGD "
          "needs one loss per example: use a keras.losses.Loss or a loss "
          "function of (y_true, y_pred) that returns per-example values")
    if values.shape.rank > 1:
      values = tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]),
                              axis=1)
    if sample_weight is not None:
      values = values * tf.cast(tf.reshape(sample_weight, [-1]),
                                values.dtype)
    return values

  def _per_example_fallback(self, x, y, sample_weight):
    """Per-row gradients of the whole model when its layers cannot be
    wrapped (a subclassed model): each example's gradient through a batch of
    two copies of it with weights (1, 0), vectorized over examples. (A batch
    of one would make pfor emit size-1 batch-matmuls, which crash or err on
    CPU with oneDNN; the pair is exact.)"""
    k = self._augmentation_multiplicity

    def fallback(tape, loss_rows, variables):
      del tape, loss_rows

      def one(example):
        xi, yi, wi = example
        pair = lambda t: tf.stack([t, t])
        xs, ys = (tf.nest.map_structure(pair, xi),
                  tf.nest.map_structure(pair, yi))
        with tf.GradientTape() as tape:
          rows = self.per_example_losses(ys, self.model(xs, training=True))
          value = rows[0] * tf.cast(wi, rows.dtype) / k
        return tape.gradient(
            value, variables,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)

      batch = tf.shape(tf.nest.flatten(x)[0])[0]
      w = (tf.ones([batch]) if sample_weight is None else
           tf.reshape(tf.cast(sample_weight, tf.float32), [-1]))
      return tf.vectorized_map(one, (x, y, w))
    return fallback

  def _warn_fallback(self, why):
    if not type(self)._warned_fallback:
      type(self)._warned_fallback = True
      logging.warning(
          "tdp.make_private: the whole-model per-example fallback computes "
          "the per-example gradients (correct, but about B times slower than "
          "the fast path) because %s.", why)

  def train_step(self, data):
    if self.loss is None:
      raise ValueError("compile the private model with a loss: DP-SGD clips "
                       "the gradient of each example's loss")
    self._check_optimizer()
    keras = frontends.of(self).keras
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = self.model.trainable_variables
    dp_step.redraw_selections(variables, self._iterations)
    specs = {variables_lib.key(v): dp_step.wrapper_mask_spec(v)
             for v in variables}
    if self._physical_batch_size is None:
      sums, examples, logs = self._chunk(x, y, sample_weight, variables,
                                         specs)
    else:
      sums, examples, logs = self._chunks(x, y, sample_weight, variables,
                                          specs)
    grads = dp_step.privatize(sums, examples, variables, specs,
                              self._mechanism,
                              noise_key=self._secret.variable,
                              step=self._iterations)
    keys = [variables_lib.key(v) for v in variables]
    masked_apply(
        self._apply, self._slots, grads, variables,
        [None if specs[k][0] is None else specs[k][0].value for k in keys],
        [specs[k][1] for k in keys], who=type(self.base_optimizer).__name__)
    self._iterations.assign_add(1)
    return logs()

  def _chunk(self, x, y, sample_weight, variables, specs):
    """`(clipped sums, examples, logs fn)` of one batch, processed at once."""
    with tf.GradientTape() as tape:
      y_pred = self.model(x, training=True)
      rows = self.per_example_losses(y, y_pred, sample_weight)
    if not tf.executing_eagerly():
      validation.check_graph(rows.graph, "tdp.make_private")
    k = self._augmentation_multiplicity
    valid = None
    if sample_weight is not None:  # padding rows (weight 0) are no example
      valid = tf.reshape(tf.cast(sample_weight, tf.float32), [-1, k])[:, 0] > 0
    sums, examples = dp_step.clipped_sums(
        tape, rows, variables, specs, self._mechanism,
        augmentation_multiplicity=k, valid=valid,
        loss_scale=self._loss_scale(),
        fallback=self._per_example_fallback(x, y, sample_weight),
        on_fallback=self._warn_fallback)
    self._track_loss(x, y, y_pred, sample_weight, rows)
    return sums, examples, self.get_metrics_result

  def _chunks(self, x, y, sample_weight, variables, specs):
    """`(clipped sums, examples, logs fn)` of one logical batch, processed
    in chunks of at most P examples (P*K rows) inside a `tf.while_loop`:
    one chunk's activations and per-example work live at a time."""
    rows_per_chunk = self._physical_batch_size * self._augmentation_multiplicity
    total = tf.shape(tf.nest.flatten(x)[0])[0]
    count = (total + rows_per_chunk - 1) // rows_per_chunk
    keys = [variables_lib.key(v) for v in variables if not specs[
        variables_lib.key(v)][1]]
    shapes = {variables_lib.key(v): v.shape for v in variables}

    static = tf.nest.flatten(x)[0].shape[0]

    def part(structure, i):
      """Chunk i; with a static batch that chunks evenly (padded batches)
      every chunk has a static shape, so XLA compiles the loop once."""
      def chunk(t):
        if static is not None and static % rows_per_chunk == 0:
          return tf.reshape(t, [static // rows_per_chunk, rows_per_chunk] +
                            t.shape.as_list()[1:])[i]
        return t[i * rows_per_chunk:(i + 1) * rows_per_chunk]
      return tf.nest.map_structure(chunk, structure)

    def body(i, examples, acc):
      xs, ys = part(x, i), part(y, i)
      ws = None if sample_weight is None else part(sample_weight, i)
      sums, n, _ = self._chunk(xs, ys, ws, variables, specs)
      acc = [a + (sums[k] if k in sums else tf.zeros_like(a))
             for k, a in zip(keys, acc)]
      return i + 1, examples + n, acc

    _, examples, acc = tf.while_loop(
        lambda i, *_: i < count, body,
        (tf.constant(0), tf.constant(0),
         [tf.zeros(shapes[k], tf.float32) for k in keys]))
    return dict(zip(keys, acc)), examples, self.get_metrics_result

  def get_config(self):
    """The mechanism's parameters and the step count; never the key
    (`noise_seed` only if the user gave one)."""
    keras = frontends.of(self).keras
    config = {
        "name": self.name,
        "model": keras.saving.serialize_keras_object(self.model),
        "l2_norm_clip": self.l2_norm_clip,
        "noise_multiplier": self.noise_multiplier,
        "expected_batch_size": self.expected_batch_size,
        "augmentation_multiplicity": self._augmentation_multiplicity,
        "iterations": int(self._iterations.numpy()),
    }
    if self._physical_batch_size is not None:
      config["physical_batch_size"] = self._physical_batch_size
    if self._noise_seed is not None:
      config["noise_seed"] = self._noise_seed
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    keras = frontends.of_class(cls).keras
    config = dict(config)
    model = keras.saving.deserialize_keras_object(
        config.pop("model"), custom_objects=custom_objects)
    return cls(model, **config)


def make_private(private_class, model, *, l2_norm_clip: float,
                 noise_multiplier: float, expected_batch_size: float,
                 noise_seed: Optional[int] = None,
                 augmentation_multiplicity: int = 1,
                 physical_batch_size: Optional[int] = None):
  """`private_class(model wrapped, ...)` (`tdp.make_private`)."""
  from tfdpprune import pruning  # pylint: disable=g-import-not-at-top
  if isinstance(model, PrivateModelMixin):
    raise ValueError(f"model {model.name!r} is already private")
  if not model.built:
    raise ValueError(
        f"make_private needs a built model ({model.name!r} is not): start it "
        "with keras.Input(shape) or call model.build(input_shape) first")
  validation.validate(model, strict=True)
  fe = frontends.of(model)
  if fe.is_graph_model(model) and not pruning.wrappers(model):
    model = pruning.wrap(model)
  return private_class(
      model, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      expected_batch_size=expected_batch_size, noise_seed=noise_seed,
      augmentation_multiplicity=augmentation_multiplicity,
      physical_batch_size=physical_batch_size)
