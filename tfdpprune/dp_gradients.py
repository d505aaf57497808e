"""Masked DP gradients: the per-example half of the masked DP optimizers.

One step over B examples with selection masks m (1 = selected):

1. per-example gradients g_i of the selected variables only (variables whose
   mask is all zero are left out of the computation);
2. masked before the norm: g_i * m; clipped jointly over all selected
   coordinates to L2 norm C: c_i = C / max(||g_i * m||, C);
3. summed: s = sum_i c_i (g_i * m);
4. Gaussian noise N(0, sigma^2 C^2) added on selected coordinates only,
   once per global step: with R replicas (`tf.distribute`), each replica
   sums its own examples and only replica 0 adds noise, so the all-reduced
   sum carries exactly one draw;
5. divided by B (or by `expected_batch_size` under Poisson sampling; B is
   the global batch across replicas).

The update rule (SGD, Adam) lives in `optimizer.py` and masks the *update*.
An example whose gradient (or loss) is not finite gets clipping coefficient
0 and contributes nothing. The noise comes from a secret key drawn from OS
entropy at construction (or from an explicit `noise_seed`); the key is kept
in memory only: checkpoints, SavedModels and `.keras` files never hold it.

`MaskedDPGradients` is a mixin placed before a TF Privacy generic DP Keras
optimizer class in the bases of each optimizer.
"""

import dataclasses
import numbers
import sys
import types
from typing import Dict, Optional, Tuple
import weakref

from absl import logging
import numpy as np

from tfdpprune import masks as masks_lib
from tfdpprune import per_example
from tfdpprune import pruning
from tfdpprune import randomness
from tfdpprune import validation
from tfdpprune._compat import gaussian_query
from tfdpprune._compat import keras
from tfdpprune._compat import tf

_Spec = per_example.MaskSpec


def _static_structure(mask: np.ndarray) -> Tuple[str, bool]:
  """(structure, all_zero) of a constant 0/1 mask."""
  if not mask.any():
    return per_example.SCALAR, True
  if mask.all():
    return per_example.NONE, False
  flat = mask.reshape(-1, mask.shape[-1]) if mask.ndim else mask.reshape(1, 1)
  if (flat == flat.max(axis=0, keepdims=True)).all():
    return per_example.OUT, False
  return per_example.WEIGHT, False


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
        out[var.ref()] = (mask, per_example.WEIGHT, False)
        continue
      value = np.asarray(mask)
      if value.shape != tuple(var.shape):
        raise ValueError(f"masks: mask of {var.name} has shape {value.shape},"
                         f" the variable {tuple(var.shape)}")
      if not np.isin(value, (0, 1)).all():
        raise ValueError(f"masks: mask of {var.name} must contain only 0 and 1")
      structure, all_zero = _static_structure(value.astype(bool))
      if structure == per_example.NONE:
        continue
      out[var.ref()] = (value.astype(var.dtype.as_numpy_dtype), structure,
                        all_zero)
    return out

  def _mask_spec(self, var) -> Tuple[Optional[_Spec], bool]:
    """(mask spec or None if fully selected, statically excluded)."""
    parts, structures, excluded = [], [], False
    user = self._masks.get(var.ref())
    if user is not None:
      mask, structure, all_zero = user
      excluded |= all_zero
      parts.append(tf.cast(tf.convert_to_tensor(mask), var.dtype))
      structures.append(structure)
    owner = pruning.wrapper_of(var)
    if owner is not None:
      role = owner.role_of(var)
      if role is not None:
        excluded |= owner.statically_frozen(role)
        wmask = owner.mask(role)
        if wmask is not None:
          parts.append(tf.cast(wmask, var.dtype))
          structures.append(owner.structure())
    if not parts:
      return None, excluded
    value = parts[0]
    for p in parts[1:]:
      value = value * p
    order = [per_example.SCALAR, per_example.OUT, per_example.WEIGHT]
    finest = max(structures, key=order.index)
    return _Spec(value, finest), excluded

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
    k = self._augmentation_multiplicity
    with tape:
      if loss.shape.rank > 1:
        loss = tf.reduce_mean(tf.reshape(loss, [tf.shape(loss)[0], -1]), 1)
      # K augmented rows per example: the example's loss is their mean.
      loss_sum = tf.reduce_sum(loss) / k if k > 1 else tf.reduce_sum(loss)
    loss_rows = loss
    if k > 1:
      tf.debugging.assert_equal(
          tf.shape(loss)[0] % k, 0, message=(
              f"augmentation_multiplicity={k}: the batch must hold {k} "
              "consecutive rows per example"))
      loss = tf.reduce_mean(tf.reshape(loss, [-1, k]), axis=1)

    self._check_models(var_list, loss)
    for selector in masks_lib.selectors(self._owners(var_list)):
      selector.update(self.iterations)

    specs, selected = {}, []
    for var in var_list:
      spec, excluded = self._mask_spec(var)
      specs[var.ref()] = (spec, excluded)
      if not excluded:
        selected.append(var)

    with tf.name_scope(self._name + "/dp_gradients"), \
        per_example.rows_per_example(k):
      batch = tf.shape(loss)[0]
      plan, why = self._fast_plan(selected, loss_rows)
      if plan is not None:
        sq_norms, sums_of = self._fast_norms(plan, specs, tape, loss_sum,
                                             loss, loss_rows)
      else:
        sq_norms, sums_of = self._fallback_norms(selected, specs, tape,
                                                 loss, loss_rows, why)
      norms = tf.sqrt(sq_norms)
      clip = tf.constant(self._l2_norm_clip, norms.dtype)
      # A non-finite input, activation or gradient of example i makes its
      # norm (and usually its loss) non-finite: coefficient 0, and the sums
      # are then taken over inputs with its rows zeroed (0 * NaN is NaN).
      finite = tf.math.is_finite(norms) & tf.math.is_finite(
          tf.cast(loss, norms.dtype))
      coef = tf.where(finite, clip / tf.maximum(norms, clip),
                      tf.zeros_like(norms))
      self._clip_fraction.assign(tf.math.divide_no_nan(
          tf.reduce_sum(tf.cast(norms > clip, tf.float32)),
          tf.cast(batch, tf.float32)))
      sums = sums_of(coef, finite)
      replica = _replica_context()
      if not self._expected_batch_size and not self._warned_denominator:
        type(self)._warned_denominator = True
        logging.warning(
            "%s has no expected_batch_size: it divides each step by the "
            "realized batch size, which is right only for fixed-size "
            "batches. Under Poisson sampling (tdp.poisson_dataset) the "
            "realized size is private: pass expected_batch_size=B (or train "
            "with tdp.PrivacyCallback, which sets it).", type(self).__name__)
      if self._expected_batch_size:
        denominator = tf.constant(float(self._expected_batch_size))
      elif replica is not None:  # the global batch of this step
        denominator = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                         tf.cast(batch, tf.float32))
      else:
        denominator = tf.cast(batch, tf.float32)
      # Noise once per global step: only replica 0 adds its draw.
      gate = (1.0 if replica is None else tf.cast(
          tf.equal(replica.replica_id_in_sync_group, 0), tf.float32))
      grads = []
      for index, var in enumerate(var_list):
        spec, excluded = specs[var.ref()]
        if excluded:
          grads.append(tf.zeros_like(var))
          continue
        total = sums.get(var.ref())
        if total is None:  # selected but unconnected to the loss
          total = tf.zeros_like(var)
        total = tf.cast(total, var.dtype)
        noise = tf.random.stateless_normal(
            tf.shape(var), randomness.step_seed(self._noise_key,
                                                self.iterations, index),
            stddev=self._l2_norm_clip * self._noise_multiplier,
            dtype=var.dtype) * tf.cast(gate, var.dtype)
        if spec is not None:
          noise = noise * spec.value
        grads.append((total + noise) / tf.cast(denominator, var.dtype))
    return list(zip(grads, var_list))

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
      if model in self._validated_models:
        continue
      if refs is None:
        refs = {v.ref() for v in var_list}
      if any(v.ref() in refs for v in model.trainable_variables):
        validation.validate(model, strict=True)
        self._validated_models.add(model)
    if not tf.executing_eagerly():
      ops = validation.batch_statistics_ops(loss.graph)
      if ops:
        raise ValueError(
            f"{type(self).__name__}: the traced step holds ops that "
            "normalize with batch statistics (training-mode "
            f"BatchNormalization): {ops[:5]}. They mix the examples of a "
            "batch, so per-example gradients and DP-SGD's sensitivity bound "
            "are undefined. Fix: replace BatchNormalization by "
            "GroupNormalization or LayerNormalization, or freeze it "
            "(layer.trainable = False).")

  def _owners(self, var_list):
    seen, out = set(), []
    for var in var_list:
      owner = pruning.wrapper_of(var)
      if owner is not None and id(owner) not in seen:
        seen.add(id(owner))
        out.append(owner)
    return out

  def _fast_plan(self, selected, loss):
    """`({wrapper: (captures, [vars])}, None)` if every selected variable has
    a live per-example capture, else `(None, why)`."""
    graph = None if tf.executing_eagerly() else loss.graph
    plan = {}
    for var in selected:
      owner = pruning.wrapper_of(var)
      if owner is None or owner.role_of(var) is None:
        return None, (f"variable {var.name} is not in a layer prepared by "
                      "tdp.prune (call model = tdp.prune(model) before "
                      "compile; a subclassed model cannot be prepared)")
      captures = owner.captures(graph)
      if not captures:
        return None, (f"layer {owner.layer.name!r} was not called in this "
                      "step's graph")
      for capture in captures:
        why = _not_per_example(capture, loss)
        if why:
          return None, f"layer {owner.layer.name!r} {why}"
      plan.setdefault(owner, (captures, []))[1].append(var)
    return plan, None

  def _fast_norms(self, plan, specs, tape, loss_sum, loss, loss_rows):
    """Per-layer norms from captured activations and one backward pass.

    Returns `(sq_norms [B], sums_of)`, `sums_of(coef, finite)` giving the
    clipped sums `{var ref: sum}`.
    """
    owners = list(plan)
    zs = [c.outputs for o in owners for c in plan[o][0]]
    deltas = tape.gradient(loss_sum, zs) if zs else []
    layers, i = [], 0
    for owner in owners:
      captures, variables = plan[owner]
      pairs = []
      for capture in captures:
        if deltas[i] is not None:
          pairs.append((capture, deltas[i]))
        i += 1
      if pairs:
        masks = {}
        for var in variables:
          spec = specs[var.ref()][0]
          masks[owner.role_of(var)] = spec if spec is not None else _Spec(None)
        layers.append((owner, {owner.role_of(v): v for v in variables},
                       pairs, masks))

    def per_layer(keep):
      """Norms and sum functions; with `keep`, over sanitized captures."""
      sq_norms, role_sums = tf.zeros_like(loss), []
      for owner, roles, pairs, masks in layers:
        if keep is not None:
          rows = tf.repeat(keep, per_example.group_size())
          pairs = [(dataclasses.replace(c, inputs=_zero_rows(c.inputs, rows)),
                    _zero_rows(d, rows)) for c, d in pairs]
        sq, role_sum = owner.sampler.per_example(owner.layer, pairs, masks)
        sq_norms = sq_norms + tf.cast(sq, sq_norms.dtype)
        role_sums.append((roles, role_sum))

      def sums(coef):
        out = {}
        for roles, role_sum in role_sums:
          out.update({roles[r].ref(): s for r, s in role_sum(coef).items()})
        return out
      return sq_norms, sums

    sq_norms, raw_sums = per_layer(None)
    # Dynamic shapes: each layer's output gradient must have one row per
    # example (a broadcast layer output would mix them), checked at run time.
    checks = [tf.debugging.assert_equal(
        tf.shape(d)[0], tf.shape(loss_rows)[0], message=(
            f"layer {owner.layer.name!r}: output rows are not the batch's "
            "examples; feed it batch-major inputs"))
              for owner, _, pairs, _ in layers for _, delta in pairs
              for d in tf.nest.flatten(delta) if d is not None and
              (d.shape[0] is None or loss_rows.shape[0] is None)]
    if checks:
      with tf.control_dependencies(checks):
        sq_norms = tf.identity(sq_norms)
    return sq_norms, _guarded(raw_sums, lambda keep: per_layer(keep)[1])

  def _fallback_norms(self, selected, specs, tape, loss, loss_rows, why=None):
    """Vectorized (pfor) jacobian per-example gradients, for any model."""
    if not type(self)._warned_fallback:
      type(self)._warned_fallback = True
      logging.warning(
          "%s: the whole-model vectorized jacobian "
          "computes the per-example gradients (correct, but about B times "
          "slower than the fast path) because %s.", type(self).__name__,
          why or
          "the per-layer fast path is unavailable")
    if not selected:
      return tf.zeros_like(loss), lambda coef, finite: {}
    k = per_example.group_size()
    if k > 1:
      with tape:  # recorded, so the jacobian flows through the 1/k
        loss_rows = loss_rows / k
    jacobians = per_example.jacobian_per_example(tape, loss_rows, selected)

    def engines(keep):
      sq_norms, fns = tf.zeros_like(loss), []
      for var, g in zip(selected, jacobians):
        spec = specs[var.ref()][0]
        sq, fn = per_example.materialized_engine(
            g if keep is None else _zero_rows(g, tf.repeat(keep, k)),
            spec if spec is not None else _Spec(None))
        sq_norms += tf.cast(sq, sq_norms.dtype)
        fns.append((var, fn))
      return sq_norms, lambda coef: {v.ref(): fn(coef) for v, fn in fns}

    sq_norms, raw_sums = engines(None)
    return sq_norms, _guarded(raw_sums, lambda keep: engines(keep)[1])

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


def _replica_context():
  """The replica context of a multi-replica step, or None."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return None
  return ctx


def _not_per_example(capture, loss) -> Optional[str]:
  """Why a capture's rows are not the batch's examples, or None.

  A layer applied to a batch-independent input (e.g. position embeddings of
  `tf.range(T)` broadcast over the batch later) has outputs with a leading
  dimension of 1: its output gradient sums all examples, so per-example
  gradients cannot come from it.
  """
  batch = loss.shape[0]
  for t in tf.nest.flatten(capture.outputs):
    lead = t.shape[0] if t.shape.rank else None
    if not t.shape.rank or (lead is not None and batch is not None and
                            lead != batch) or (lead == 1 and batch is None):
      return (f"runs on a batch-independent input (output shape {t.shape}, "
              f"batch {batch}): its output is broadcast over the examples, "
              "so its per-example gradients need the whole-model jacobian. "
              "Fix: feed it batch-major inputs, e.g. position ids "
              "tf.broadcast_to(tf.range(T), tf.shape(tokens)), or freeze it")
  return None


def _guarded(raw_sums, sanitized_sums):
  """`sums_of(coef, finite)`: the raw sums when every example is finite (no
  extra work per step), else sums over inputs with bad examples zeroed."""
  def sums_of(coef, finite):
    raw = raw_sums(coef)
    if not raw:
      return raw
    refs = list(raw)

    def sanitized():
      sums = sanitized_sums(finite)(coef)
      return [sums[r] for r in refs]
    values = tf.cond(tf.reduce_all(finite), lambda: [raw[r] for r in refs],
                     sanitized)
    return dict(zip(refs, values))
  return sums_of


def _zero_rows(structure, keep):
  """`structure` (a tensor or nested tensors) with the examples where `keep`
  is False set to 0 (float tensors of rank >= 1 only)."""
  def zero(t):
    if not (isinstance(t, tf.Tensor) and t.dtype.is_floating and
            t.shape.rank):
      return t
    k = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
    return tf.where(k, t, tf.zeros_like(t))
  return tf.nest.map_structure(zero, structure)


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

