"""The masked DP Keras SGD optimizer (a TF Privacy generic DP SGD subclass).

One step over B examples with selection masks m (1 = selected):

1. per-example gradients g_i of the selected variables only (variables whose
   mask is all zero are left out of the computation);
2. masked before the norm: g_i * m; clipped jointly over all selected
   coordinates to L2 norm C: c_i = C / max(||g_i * m||, C);
3. summed: s = sum_i c_i (g_i * m);
4. Gaussian noise N(0, sigma^2 C^2) added on selected coordinates only;
5. divided by B (or by `expected_batch_size` under Poisson sampling);
6. applied with SGD / momentum, masking the *update*: a coordinate with m = 0
   in this step does not move in this step, and its momentum is kept.
"""

from typing import Dict, Optional, Tuple

from absl import logging
import numpy as np

from tfdpprune import masks as masks_lib
from tfdpprune import per_example
from tfdpprune import pruning
from tfdpprune._compat import dp_optimizer_keras
from tfdpprune._compat import gaussian_query
from tfdpprune._compat import keras
from tfdpprune._compat import tf

_Spec = per_example.MaskSpec

# TF Privacy's `DPKerasSGDOptimizer` is a factory function; this is the class
# it instantiates: `make_keras_generic_optimizer_class(legacy.SGD)`.
_GenericDPSGD = dp_optimizer_keras.GenericDPSGDOptimizer


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


@keras.saving.register_keras_serializable(package="tfdpprune")
class MaskedDPKerasSGDOptimizer(_GenericDPSGD):
  """DP-SGD that clips, noises and updates only selected coordinates.

  A `keras.optimizers.legacy.SGD` and a TF Privacy DP optimizer. Use it with a
  per-example loss (`reduction=keras.losses.Reduction.NONE`):

  ```python
  import tfdpprune as tdp
  keras = tdp.keras
  model = tdp.prune(model)      # fast per-example gradients (optional)
  opt = tdp.MaskedDPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
                                      learning_rate=0.1, momentum=0.9)
  model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE))
  model.fit(x, y, batch_size=256)
  ```

  Args:
    l2_norm_clip: C > 0, the per-example L2 clip norm over the selected
      coordinates of all variables together.
    noise_multiplier: sigma >= 0; the noise std on each selected coordinate of
      the summed gradient is sigma * C.
    masks: optional `{var.ref(): mask}` dict or `(var, mask)` pairs; a mask is
      a 0/1 array or `tf.Variable` of the variable's shape (a variable may
      change between steps without retracing). Variables not named are fully
      selected. Masks of variables in `tdp.prune` wrappers are combined
      (multiplied) with these.
    learning_rate, momentum, nesterov: as in `keras.optimizers.legacy.SGD`.
    expected_batch_size: divide the noised sum by this instead of the actual
      batch size (right for Poisson-sampled, variable-size batches).
    noise_seed: seed of the noise generator (a checkpointed
      `tf.random.Generator`); None draws a non-deterministic seed.
    name, **kwargs: passed to `keras.optimizers.legacy.SGD`.
  """

  _warned_fallback = False

  def __init__(self, l2_norm_clip, noise_multiplier, masks=None,
               learning_rate=0.01, momentum=0.0, nesterov=False,
               expected_batch_size=None, noise_seed=None,
               name="MaskedDPKerasSGDOptimizer", **kwargs):
    for key in ("num_microbatches", "gradient_accumulation_steps",
                "global_state"):
      value = kwargs.pop(key, None)
      if key != "global_state" and value not in (None, 1):
        raise ValueError(f"{key}={value!r} is not supported: this optimizer "
                         "clips per example.")
    if not l2_norm_clip > 0:
      raise ValueError(f"l2_norm_clip={l2_norm_clip!r} must be > 0")
    if not noise_multiplier >= 0:
      raise ValueError(f"noise_multiplier={noise_multiplier!r} must be >= 0")
    if expected_batch_size is not None and not expected_batch_size > 0:
      raise ValueError(
          f"expected_batch_size={expected_batch_size!r} must be > 0 or None")
    query = gaussian_query.GaussianSumQuery(
        l2_norm_clip, l2_norm_clip * noise_multiplier)
    super().__init__(query, None, 1, learning_rate=learning_rate,
                     momentum=momentum, nesterov=nesterov, name=name, **kwargs)
    self._l2_norm_clip = float(l2_norm_clip)
    self._noise_multiplier = float(noise_multiplier)
    self._expected_batch_size = expected_batch_size
    self._noise_seed = noise_seed
    with tf.init_scope():
      if noise_seed is None:
        self._noise_rng = tf.random.Generator.from_non_deterministic_state()
      else:
        self._noise_rng = tf.random.Generator.from_seed(noise_seed)
      # A diagnostic computed from raw private gradients, outside the DP
      # guarantee: the fraction of examples clipped in the last step.
      self._clip_fraction = tf.Variable(
          0.0, trainable=False, name="clip_fraction_diagnostic",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self._track_trackable(self._noise_rng, name="noise_rng")
    self._masks = self._normalize_masks(masks)

  # -- properties -----------------------------------------------------------

  @property
  def l2_norm_clip(self):
    return self._l2_norm_clip

  @property
  def noise_multiplier(self):
    return self._noise_multiplier

  @property
  def expected_batch_size(self):
    return self._expected_batch_size

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
          "MaskedDPKerasSGDOptimizer got a scalar (already reduced) loss, but "
          "DP-SGD clips per example and needs one loss per example: build the "
          "loss with reduction=keras.losses.Reduction.NONE, e.g. "
          "keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
          "reduction=keras.losses.Reduction.NONE).")
    with tape:
      if loss.shape.rank > 1:
        loss = tf.reduce_mean(tf.reshape(loss, [tf.shape(loss)[0], -1]), 1)
      loss_sum = tf.reduce_sum(loss)

    for selector in masks_lib.selectors(self._owners(var_list)):
      selector.update(self.iterations)

    specs, selected = {}, []
    for var in var_list:
      spec, excluded = self._mask_spec(var)
      specs[var.ref()] = (spec, excluded)
      if not excluded:
        selected.append(var)

    with tf.name_scope(self._name + "/dp_gradients"):
      batch = tf.shape(loss)[0]
      plan = self._fast_plan(selected, loss)
      if plan is not None:
        sq_norms, sum_fns = self._fast_norms(plan, specs, tape, loss_sum,
                                             batch)
      else:
        sq_norms, sum_fns = self._fallback_norms(selected, specs, tape, loss)
      norms = tf.sqrt(sq_norms)
      clip = tf.constant(self._l2_norm_clip, norms.dtype)
      coef = clip / tf.maximum(norms, clip)
      self._clip_fraction.assign(tf.math.divide_no_nan(
          tf.reduce_sum(tf.cast(norms > clip, tf.float32)),
          tf.cast(batch, tf.float32)))
      sums: Dict[object, tf.Tensor] = {}
      for fn in sum_fns:
        sums.update(fn(coef))
      denominator = (float(self._expected_batch_size)
                     if self._expected_batch_size else batch)
      grads = []
      for var in var_list:
        spec, excluded = specs[var.ref()]
        if excluded:
          grads.append(tf.zeros_like(var))
          continue
        total = sums.get(var.ref())
        if total is None:  # selected but unconnected to the loss
          total = tf.zeros_like(var)
        total = tf.cast(total, var.dtype)
        noise = self._noise_rng.normal(
            tf.shape(var), stddev=self._l2_norm_clip * self._noise_multiplier,
            dtype=var.dtype)
        if spec is not None:
          noise = noise * spec.value
        grads.append((total + noise) / tf.cast(denominator, var.dtype))
    return list(zip(grads, var_list))

  def _owners(self, var_list):
    seen, out = set(), []
    for var in var_list:
      owner = pruning.wrapper_of(var)
      if owner is not None and id(owner) not in seen:
        seen.add(id(owner))
        out.append(owner)
    return out

  def _fast_plan(self, selected, loss):
    """`{wrapper: [vars]}` if every selected variable has a live capture."""
    graph = None if tf.executing_eagerly() else loss.graph
    plan = {}
    for var in selected:
      owner = pruning.wrapper_of(var)
      if owner is None or owner.role_of(var) is None:
        return None
      captures = owner.captures(graph)
      if not captures:
        return None
      plan.setdefault(owner, (captures, []))[1].append(var)
    return plan

  def _fast_norms(self, plan, specs, tape, loss_sum, batch):
    """Per-layer norms from captured activations and one backward pass."""
    owners = list(plan)
    zs = [c.outputs for o in owners for c in plan[o][0]]
    deltas = tape.gradient(loss_sum, zs) if zs else []
    sq_norms = tf.zeros([batch], loss_sum.dtype)
    sum_fns = []
    i = 0
    for owner in owners:
      captures, variables = plan[owner]
      pairs = []
      for capture in captures:
        if deltas[i] is not None:
          pairs.append((capture, deltas[i]))
        i += 1
      if not pairs:
        continue
      masks = {}
      for var in variables:
        spec = specs[var.ref()][0]
        masks[owner.role_of(var)] = spec if spec is not None else _Spec(None)
      sq, role_sum = owner.sampler.per_example(owner.layer, pairs, masks)
      sq_norms += tf.cast(sq, sq_norms.dtype)
      roles = {owner.role_of(v): v for v in variables}

      def sum_fn(coef, role_sum=role_sum, roles=roles):
        return {roles[r].ref(): s for r, s in role_sum(coef).items()}
      sum_fns.append(sum_fn)
    return sq_norms, sum_fns

  def _fallback_norms(self, selected, specs, tape, loss):
    """Vectorized (pfor) jacobian per-example gradients, for any model."""
    if not MaskedDPKerasSGDOptimizer._warned_fallback:
      MaskedDPKerasSGDOptimizer._warned_fallback = True
      logging.warning(
          "MaskedDPKerasSGDOptimizer: some selected variables are not in "
          "layers prepared by tdp.prune (or their layer was not called in "
          "this step), so per-example gradients use the generic vectorized "
          "jacobian, which is much slower. Wrap the model with "
          "model = tdp.prune(model) for the fast path.")
    if not selected:
      return tf.zeros([tf.shape(loss)[0]], loss.dtype), []
    jacobians = per_example.jacobian_per_example(tape, loss, selected)
    sq_norms, sum_fns = 0.0, []
    for var, g in zip(selected, jacobians):
      spec = specs[var.ref()][0]
      sq, fn = per_example.materialized_engine(
          g, spec if spec is not None else _Spec(None))
      sq_norms += sq

      def sum_fn(coef, fn=fn, var=var):
        return {var.ref(): fn(coef)}
      sum_fns.append(sum_fn)
    return sq_norms, sum_fns

  def get_gradients(self, loss, params):
    raise NotImplementedError(
        "MaskedDPKerasSGDOptimizer supports TF2 (eager / tf.function) "
        "training only; Keras v1 graph-mode get_gradients is not supported.")

  # -- updates --------------------------------------------------------------

  def _resource_apply_dense(self, grad, var, apply_state=None):
    spec, excluded = self._mask_spec(var)
    if excluded:
      return tf.no_op()
    if spec is None:
      return super()._resource_apply_dense(grad, var, apply_state)
    device, dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((device, dtype)) or
                    self._fallback_apply_state(device, dtype))
    selected = spec.value > 0
    lr = coefficients["lr_t"]
    if self._momentum:
      accum = self.get_slot(var, "momentum")
      momentum = coefficients["momentum"]
      new_accum = momentum * accum - lr * grad
      step = (momentum * new_accum - lr * grad) if self.nesterov else new_accum
      update_accum = accum.assign(tf.where(selected, new_accum, accum),
                                  read_value=False)
      update_var = var.assign(tf.where(selected, var + step, var),
                              read_value=False)
      return tf.group(update_accum, update_var)
    return var.assign(tf.where(selected, var - lr * grad, var),
                      read_value=False)

  def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
    dense = tf.math.unsorted_segment_sum(grad, indices, tf.shape(var)[0])
    return self._resource_apply_dense(dense, var, apply_state)

  # -- serialization --------------------------------------------------------

  def get_config(self):
    config = keras.optimizers.legacy.SGD.get_config(self)
    config.update(l2_norm_clip=self._l2_norm_clip,
                  noise_multiplier=self._noise_multiplier,
                  expected_batch_size=self._expected_batch_size,
                  noise_seed=self._noise_seed)
    return config

