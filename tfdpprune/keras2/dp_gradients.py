"""Masked DP gradients: the Keras 2 optimizers' hook into the core DP step.

TF Privacy's Keras optimizers compute gradients in `_compute_gradients`;
`MaskedDPGradients` (a mixin placed before a TF Privacy generic DP Keras
optimizer class) replaces it with `tfdpprune.core.dp_step.dp_gradients`:
per-example gradients of the selected coordinates, masked before the norm,
clipped jointly to C, summed, noised once per global step and divided by B
(`expected_batch_size` under Poisson sampling). This module holds only what
is Keras 2's: the optimizer's arguments (TF Privacy's positional order), the
user's `masks`, the per-example loss of `model.fit`, the validation of the
models being trained, and the masked update (an unselected coordinate does
not move, nor does its optimizer state). The update rules live in
`optimizer.py`.

An example whose gradient (or loss) is not finite gets clipping coefficient
0 and contributes nothing. The noise comes from a secret key drawn from OS
entropy at construction (or from an explicit `noise_seed`); the key is kept
in memory only: checkpoints, SavedModels and `.keras` files never hold it.
"""

import numbers
import sys
import types
from typing import Optional, Tuple
import weakref

from absl import logging
import numpy as np

from tfdpprune.core import dp_step
from tfdpprune.core import engines
from tfdpprune.core import mechanism as mechanism_lib
from tfdpprune.core import randomness
from tfdpprune.core import validation
from tfdpprune.core import variables as variables_lib
from tfdpprune.keras2.compat import gaussian_query
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.compat import tf

_Spec = engines.MaskSpec


def _static_structure(mask: np.ndarray) -> Tuple[str, bool]:
  """(structure, all_zero) of a constant 0/1 mask."""
  if not mask.any():
    return engines.SCALAR, True
  if mask.all():
    return engines.NONE, False
  flat = mask.reshape(-1, mask.shape[-1]) if mask.ndim else mask.reshape(1, 1)
  if (flat == flat.max(axis=0, keepdims=True)).all():
    return engines.OUT, False
  return engines.WEIGHT, False


def dp_arguments(l2_norm_clip, noise_multiplier, masks, expected_batch_size,
                 noise_seed, kwargs):
  """Validates the DP arguments; returns `(query, masks, dp_state)`.

  Pops `iterations`, `num_microbatches`, `gradient_accumulation_steps` and
  `global_state` and `augmentation_multiplicity` from `kwargs` (the rest
  goes to the Keras optimizer). TF
  Privacy's positional order `(l2_norm_clip, noise_multiplier,
  num_microbatches)` works: an integer in the `masks` position is taken as
  `num_microbatches`.
  """
  num_microbatches = kwargs.pop("num_microbatches", None)
  if isinstance(masks, numbers.Integral) and not isinstance(masks, bool):
    num_microbatches, masks = int(masks), None
  if num_microbatches is not None and (
      isinstance(num_microbatches, bool) or
      not isinstance(num_microbatches, numbers.Integral) or
      num_microbatches < 1):
    raise ValueError(f"num_microbatches={num_microbatches!r} must be None "
                     "(per-example clipping) or a positive integer equal to "
                     "the batch size")
  accumulation = kwargs.pop("gradient_accumulation_steps", 1)
  if accumulation not in (None, 1):
    raise ValueError(f"gradient_accumulation_steps={accumulation!r} is not "
                     "supported; use a larger expected batch size instead")
  kwargs.pop("global_state", None)
  multiplicity = kwargs.pop("augmentation_multiplicity", 1)
  if (isinstance(multiplicity, bool) or
      not isinstance(multiplicity, numbers.Integral) or multiplicity < 1):
    raise ValueError(f"augmentation_multiplicity={multiplicity!r} must be "
                     "an integer >= 1")
  iterations = kwargs.pop("iterations", 0)
  if (isinstance(iterations, bool) or
      not isinstance(iterations, (int, np.integer)) or iterations < 0):
    raise ValueError(f"iterations={iterations!r} must be an integer >= 0")
  if not l2_norm_clip > 0:
    raise ValueError(f"l2_norm_clip={l2_norm_clip!r} must be > 0")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier={noise_multiplier!r} must be >= 0")
  if expected_batch_size is not None and not expected_batch_size > 0:
    raise ValueError(
        f"expected_batch_size={expected_batch_size!r} must be > 0 or None")
  if noise_seed is not None and (isinstance(noise_seed, bool) or
                                 not isinstance(noise_seed, int)):
    raise ValueError(f"noise_seed={noise_seed!r} must be an integer or None")
  query = gaussian_query.GaussianSumQuery(
      l2_norm_clip, l2_norm_clip * noise_multiplier)
  state = dict(l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
               expected_batch_size=expected_batch_size, noise_seed=noise_seed,
               iterations=int(iterations), num_microbatches=num_microbatches,
               augmentation_multiplicity=int(multiplicity))
  return query, masks, state


class MaskedDPGradients:
  """Per-example clipped, masked, noised gradients (see the module doc)."""

  _warned_fallback = False
  _warned_denominator = False

  def _init_dp(self, masks, l2_norm_clip, noise_multiplier,
               expected_batch_size, noise_seed, iterations, num_microbatches,
               augmentation_multiplicity):
    """Called by the optimizer's `__init__` after the Keras base's."""
    self._augmentation_multiplicity = augmentation_multiplicity
    self._l2_norm_clip = float(l2_norm_clip)
    self._noise_multiplier = float(noise_multiplier)
    self._expected_batch_size = expected_batch_size
    self._noise_seed = noise_seed
    self._num_microbatches = num_microbatches
    self._validated_models = weakref.WeakSet()
    with tf.init_scope():
      # The noise key, in a variable so that a traced graph (e.g. written to
      # TensorBoard) holds a handle, not the key. Deliberately NOT tracked:
      # no checkpoint, SavedModel or .keras file can replay the noise.
      self._noise_key = tf.Variable(
          randomness.private_key(randomness.NOISE, noise_seed),
          dtype=tf.int64, trainable=False, name="noise_key")
      # A diagnostic computed from raw private gradients, outside the DP
      # guarantee: the fraction of examples clipped in the last step.
      self._clip_fraction = tf.Variable(
          0.0, trainable=False, name="clip_fraction_diagnostic",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self._masks = self._normalize_masks(masks)
    # Created now, not lazily inside a replica function (tf.distribute).
    self.iterations.assign(int(iterations))

  # -- properties -----------------------------------------------------------

  @property
  def l2_norm_clip(self):
    return self._l2_norm_clip

  @property
  def noise_multiplier(self):
    return self._noise_multiplier

  @property
  def expected_batch_size(self):
    """B, the denominator of every step (None: the realized batch size,
    right only for fixed-size batches; under Poisson sampling the realized
    size is private). `PrivacyCallback` sets it when it is None."""
    return self._expected_batch_size

  @expected_batch_size.setter
  def expected_batch_size(self, value):
    if value is not None and not value > 0:
      raise ValueError(f"expected_batch_size={value!r} must be > 0 or None")
    self._expected_batch_size = value

  @property
  def augmentation_multiplicity(self):
    """K: each example comes as K consecutive (augmented) rows whose mean
    gradient is clipped as the example's (De et al. 2022)."""
    return self._augmentation_multiplicity

  @property
  def noise_seed(self):
    """The explicit noise seed, or None (secret noise)."""
    return self._noise_seed

  @property
  def clip_fraction(self):
    """Fraction of examples clipped in the last step (NOT private)."""
    return self._clip_fraction

  # -- masks ----------------------------------------------------------------

  def _normalize_masks(self, masks):
    """`{ref: (mask, structure, all_zero_static)}` from the user's masks."""
    if masks is None:
      return {}
    items = masks.items() if isinstance(masks, dict) else masks
    out = {}
    for i, (key, mask) in enumerate(items):
      var = key.deref() if hasattr(key, "deref") else key
      if not isinstance(var, tf.Variable):
        raise TypeError(f"masks: key {key!r} is not a tf.Variable or a "
                        "variable's .ref()")
      if isinstance(mask, tf.Variable):
        if mask.shape != var.shape:
          raise ValueError(f"masks: mask of {var.name} has shape "
                           f"{mask.shape}, the variable {var.shape}")
        self._track_trackable(mask, name=f"mask_{i}")
        out[var.ref()] = (mask, engines.WEIGHT, False)
        continue
      value = np.asarray(mask)
      if value.shape != tuple(var.shape):
        raise ValueError(f"masks: mask of {var.name} has shape {value.shape},"
                         f" the variable {tuple(var.shape)}")
      if not np.isin(value, (0, 1)).all():
        raise ValueError(f"masks: mask of {var.name} must contain only 0 and 1")
      structure, all_zero = _static_structure(value.astype(bool))
      if structure == engines.NONE:
        continue
      out[var.ref()] = (value.astype(var.dtype.as_numpy_dtype), structure,
                        all_zero)
    return out

  def _mask_spec(self, var) -> Tuple[Optional[_Spec], bool]:
    """(mask spec or None if fully selected, statically excluded): the
    user's mask times the masks of the wrappers owning `var`."""
    spec, excluded = dp_step.wrapper_mask_spec(var)
    user = self._masks.get(var.ref())
    if user is None:
      return spec, excluded
    mask, structure, all_zero = user
    parts = [tf.cast(tf.convert_to_tensor(mask), var.dtype)]
    structures = [structure]
    if spec is not None:
      parts.append(spec.value)
      structures.append(spec.structure)
    return dp_step.combine_specs(parts, structures, excluded or all_zero)

  @property
  def mechanism(self) -> mechanism_lib.Mechanism:
    """The step's `core.mechanism.Mechanism` (C, sigma, denominator)."""
    return mechanism_lib.Mechanism(self._l2_norm_clip, self._noise_multiplier,
                                   self._expected_batch_size)

  # -- gradients ------------------------------------------------------------

  def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
    """DP-SGD over selected coordinates (replaces TF Privacy's jacobian)."""
    self._was_dp_gradients_called = True
    if grad_loss is not None:
      raise ValueError("grad_loss is not supported by the DP optimizer")
    if not callable(loss) and tape is None:
      raise ValueError("`tape` is required when a `Tensor` loss is passed.")
    tape = tape if tape is not None else tf.GradientTape()
    if callable(loss):
      with tape:
        if not callable(var_list):
          tape.watch(var_list)
        loss = loss()
    if callable(var_list):
      var_list = var_list()
    var_list = tf.nest.flatten(var_list)
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank == 0:
      raise ValueError(
          f"{type(self).__name__} got a scalar (already reduced) loss, but "
          "DP-SGD clips per example and needs one loss per example: build the "
          "loss with reduction=keras.losses.Reduction.NONE, e.g. "
          "keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
          "reduction=keras.losses.Reduction.NONE).")
    self._check_microbatches(loss)
    with tape:
      if loss.shape.rank > 1:
        loss = tf.reduce_mean(tf.reshape(loss, [tf.shape(loss)[0], -1]), 1)
    self._check_models(var_list, loss)
    dp_step.redraw_selections(var_list, self.iterations)
    specs = {variables_lib.key(v): self._mask_spec(v) for v in var_list}
    if not self._expected_batch_size and not self._warned_denominator:
      type(self)._warned_denominator = True
      logging.warning(
          "%s has no expected_batch_size: it divides each step by the "
          "realized batch size, which is right only for fixed-size "
          "batches. Under Poisson sampling (tdp.poisson_dataset) the "
          "realized size is private: pass expected_batch_size=B (or train "
          "with tdp.PrivacyCallback, which sets it).", type(self).__name__)
    with tf.name_scope(self._name + "/dp_gradients"):
      grads = dp_step.dp_gradients(
          tape, loss, var_list, specs, self.mechanism,
          noise_key=self._noise_key, step=self.iterations,
          augmentation_multiplicity=self._augmentation_multiplicity,
          clip_fraction=self._clip_fraction, on_fallback=self._warn_fallback)
    return list(zip(grads, var_list))

  def _warn_fallback(self, why):
    if not type(self)._warned_fallback:
      type(self)._warned_fallback = True
      logging.warning(
          "%s: the whole-model vectorized jacobian computes the per-example "
          "gradients (correct, but about B times slower than the fast path) "
          "because %s.", type(self).__name__, why)

  def _check_microbatches(self, loss):
    """TF Privacy's `num_microbatches`: only None or the batch size."""
    n = self._num_microbatches
    if n is None:
      return
    message = (
        f"num_microbatches={n} but the batch has {{}} examples. This "
        "optimizer clips every example on its own (num_microbatches = batch "
        "size); TF Privacy with fewer microbatches clips the mean gradient "
        "of each microbatch, a different mechanism with another sensitivity. "
        "Pass num_microbatches=None (or equal to the batch size; with "
        "Poisson-sampled, variable-size batches only None works).")
    k = self._augmentation_multiplicity
    batch = None if loss.shape[0] is None else loss.shape[0] // k
    if batch is not None and batch != n:
      raise ValueError(message.format(batch))
    if batch is None:
      tf.debugging.assert_equal(tf.shape(loss)[0] // k, n,
                                message=message.format("another number of"))

  def _check_models(self, var_list, loss):
    """Refuses what breaks per-example gradients, at trace time: the models
    training `var_list` found on the Python stack (Keras' `train_step`, a
    custom loop's locals, or their attributes) are validated once each, and
    the traced graph must hold no batch-statistics op (training-mode
    BatchNormalization), whoever built it."""
    refs = None
    for model in _models_on_stack():
      wrapper = getattr(model, "optimizer", None)
      if (wrapper is not self and
          getattr(wrapper, "inner_optimizer", None) is self):
        raise ValueError(
            f"model {model.name!r} wraps {type(self).__name__} in a "
            f"{type(wrapper).__name__} (the mixed_float16 policy does this "
            "in compile): its loss scale S would multiply every per-example "
            "gradient before clipping (the clip would become C / S), and its "
            "dynamic scale skips steps whose gradients overflow, which "
            "depends on the private data. Fix: tdp.make_private(model, "
            "l2_norm_clip=..., noise_multiplier=..., expected_batch_size=...) "
            "with a plain tf_keras optimizer (a fixed public loss scale, "
            "undone in float32 before the norms), or the mixed_bfloat16 "
            "policy (no loss scale)")
      if model in self._validated_models:
        continue
      if refs is None:
        refs = {v.ref() for v in var_list}
      if any(v.ref() in refs for v in model.trainable_variables):
        validation.validate(model, strict=True)
        self._validated_models.add(model)
    if not tf.executing_eagerly():
      validation.check_graph(loss.graph, type(self).__name__)

  def get_gradients(self, loss, params):
    raise NotImplementedError(
        f"{type(self).__name__} supports TF2 (eager / tf.function) "
        "training only; Keras v1 graph-mode get_gradients is not supported.")

  def _dp_config(self):
    """The DP part of `get_config` (no secret; `noise_seed` only if given)."""
    config = dict(l2_norm_clip=self._l2_norm_clip,
                  noise_multiplier=self._noise_multiplier,
                  expected_batch_size=self._expected_batch_size,
                  iterations=int(keras.backend.get_value(self.iterations)))
    if self._noise_seed is not None:
      config["noise_seed"] = self._noise_seed
    if self._augmentation_multiplicity != 1:
      config["augmentation_multiplicity"] = self._augmentation_multiplicity
    return config

  # -- masked updates ---------------------------------------------------------

  def _masked_updates(self, grad, var, coefficients):
    """`[(variable or slot, new value)]` of the update rule (subclasses)."""
    raise NotImplementedError

  def _resource_apply_dense(self, grad, var, apply_state=None):
    """The base update where nothing is masked; else `_masked_updates`
    assigned where the step's mask selects (a coordinate not selected keeps
    its value and its optimizer slots)."""
    spec, excluded = self._mask_spec(var)
    if excluded:
      return tf.no_op()
    if spec is None:
      return super()._resource_apply_dense(grad, var, apply_state)
    device, dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((device, dtype)) or
                    self._fallback_apply_state(device, dtype))
    selected = spec.value > 0
    return tf.group(*[
        v.assign(tf.where(selected, new, v), read_value=False)
        for v, new in self._masked_updates(grad, var, coefficients)])

  def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
    dense = tf.math.unsorted_segment_sum(grad, indices, tf.shape(var)[0])
    return self._resource_apply_dense(dense, var, apply_state)


def _models_on_stack(max_depth=64):
  """Keras models referenced by the calling frames' local variables, or one
  level inside them (an object's attributes, a container's items)."""
  seen, out = set(), []

  def visit(value, nested):
    if isinstance(value, keras.Model):
      if id(value) not in seen:
        seen.add(id(value))
        out.append(value)
    elif nested:
      if isinstance(value, dict):
        children = list(value.values())
      elif isinstance(value, (list, tuple)):
        children = list(value)
      elif not isinstance(value, (type, types.ModuleType,
                                  types.FunctionType)):
        try:
          attributes = object.__getattribute__(value, "__dict__")
        except (AttributeError, TypeError):
          attributes = None
        children = (list(attributes.values())
                    if isinstance(attributes, dict) else [])
      else:
        children = []
      for child in children[:256]:
        visit(child, False)

  frame = sys._getframe(2)  # pylint: disable=protected-access
  depth = 0
  while frame is not None and depth < max_depth:
    for value in list(frame.f_locals.values()):
      visit(value, True)
    frame, depth = frame.f_back, depth + 1
  return out

