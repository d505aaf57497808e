"""The masked DP Keras optimizers: SGD and Adam with masked updates.

`MaskedDPKerasSGDOptimizer` and `MaskedDPKerasAdamOptimizer` subclass TF
Privacy's generic DP Keras SGD / Adam classes (the classes behind its
`DPKerasSGDOptimizer` / `DPKerasAdamOptimizer` factories), so each is a
`keras.optimizers.legacy` optimizer and a TF Privacy optimizer. The DP
gradient (per-example, masked, clipped, noised once; `dp_gradients.py`) is
shared; this module holds the update rules, which mask the *update*: a
coordinate not selected in a step does not move in that step, and its
optimizer state (momentum; Adam's first and second moments) is kept.
"""

from tfdpprune.keras2 import compat
from tfdpprune.keras2 import dp_gradients
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.compat import tf

# TF Privacy's generic DP optimizer classes, made from `tf_keras`'s
# `legacy.SGD` / `legacy.Adam` (`make_keras_generic_optimizer_class`).
_GenericDPSGD = compat.GenericDPSGDOptimizer
_GenericDPAdam = compat.GenericDPAdamOptimizer

# For the existing tests and callers that used the private helper here.
_static_structure = dp_gradients._static_structure  # pylint: disable=protected-access

@keras.saving.register_keras_serializable(package="tfdpprune")
class MaskedDPKerasSGDOptimizer(dp_gradients.MaskedDPGradients,
                                _GenericDPSGD):
  """DP-SGD that clips, noises and updates only selected coordinates.

  A `keras.optimizers.legacy.SGD` and a TF Privacy DP optimizer. Use it with a
  per-example loss (`reduction=keras.losses.Reduction.NONE`):

  ```python
  import tfdpprune as tdp
  keras = tdp.keras
  model = tdp.prune(model)      # fast per-example gradients (optional)
  opt = tdp.MaskedDPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
                                      learning_rate=0.1, momentum=0.9,
                                      expected_batch_size=256)
  model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE))
  batches = tdp.poisson_dataset(x, y, batch_size=256, epochs=10)
  model.fit(batches, callbacks=[tdp.PrivacyCallback(
      len(x), 256, noise_multiplier=1.1, dataset=batches)])
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
      (multiplied) with these. (An integer here is TF Privacy's positional
      `num_microbatches`; every later argument is keyword-only.)
    expected_batch_size: divide the noised sum by this instead of the actual
      batch size. Required under Poisson sampling (`tdp.poisson_dataset`):
      the realized size of a Poisson batch is private, and dividing by it
      releases it (the spread of the noise in one update reveals it). None
      (the default) divides by the realized size, right only for fixed-size
      batches; `tdp.PrivacyCallback` sets it to its batch size.
    noise_seed: None (default): the noise key is secret, drawn from OS
      entropy and never saved. An integer makes the noise reproducible and
      public (experiments only: the guarantee then assumes the adversary does
      not know the seed); it is then part of `get_config`.
    num_microbatches: for TF Privacy compatibility: None (default) or equal
      to the batch size, both meaning per-example clipping; any other value
      is refused when the step is traced (TF Privacy would clip microbatch
      means, a different mechanism).
    iterations: the optimizer's initial step count (restored by `.keras`
      loading, so the step count, and epsilon, survive save/load).
    augmentation_multiplicity: K >= 1 (De et al. 2022): the batch holds K
      consecutive augmented rows of every example; their mean gradient is
      the example's gradient, clipped as one (sensitivity still C). With
      `tdp.poisson_dataset(..., augmult=K)`.
    learning_rate, momentum, nesterov, name, **kwargs: as in
      `keras.optimizers.legacy.SGD`.

  The optimizer refuses, when it is first used, a model whose per-example
  gradients are undefined (BatchNormalization in training mode, activity
  regularizers, weight penalties; see `tdp.validate`), whether or not the
  model went through `tdp.prune`.
  """

  def __init__(self, l2_norm_clip, noise_multiplier, masks=None, *,
               learning_rate=0.01, momentum=0.0, nesterov=False,
               expected_batch_size=None, noise_seed=None,
               name="MaskedDPKerasSGDOptimizer", **kwargs):
    query, masks, state = dp_gradients.dp_arguments(
        l2_norm_clip, noise_multiplier, masks, expected_batch_size,
        noise_seed, kwargs)
    super().__init__(query, None, 1, learning_rate=learning_rate,
                     momentum=momentum, nesterov=nesterov, name=name, **kwargs)
    self._init_dp(masks, **state)

  # -- updates --------------------------------------------------------------

  def _masked_updates(self, grad, var, c):
    lr = c["lr_t"]
    if not self._momentum:
      return [(var, var - lr * grad)]
    accum = self.get_slot(var, "momentum")
    new_accum = c["momentum"] * accum - lr * grad
    step = (c["momentum"] * new_accum - lr * grad) if self.nesterov else (
        new_accum)
    return [(accum, new_accum), (var, var + step)]

  def get_config(self):
    """The constructor arguments, with the step count and no secret.

    `iterations` is included so that a model reloaded from a `.keras` file
    (which does not store legacy optimizer variables) keeps its step count,
    and `PrivacyCallback` the epsilon of all steps taken. `noise_seed` is
    included only if the user passed one.
    """
    config = keras.optimizers.legacy.SGD.get_config(self)
    config.update(self._dp_config())
    return config


@keras.saving.register_keras_serializable(package="tfdpprune")
class MaskedDPKerasAdamOptimizer(dp_gradients.MaskedDPGradients,
                                 _GenericDPAdam):
  """DP Adam that clips, noises and updates only selected coordinates.

  A `keras.optimizers.legacy.Adam` and a TF Privacy DP optimizer, with the
  same DP gradient and masking contract as `MaskedDPKerasSGDOptimizer`: a
  coordinate not selected in a step moves neither its value nor its first
  and second moments (nor `vhat` with amsgrad) in that step. The moments of
  a selected coordinate see the privatized (clipped, noised) gradient only,
  so Adam is post-processing of the DP gradients: the accounting is that of
  DP-SGD. Bias correction uses the optimizer's global step, so a coordinate
  first selected late takes a larger first step than Adam's usual one (about
  lr * (1 - beta_1) / sqrt(1 - beta_2)); warm-up or select mode's re-draws
  keep that bounded by the learning rate.

  ```python
  opt = tdp.MaskedDPKerasAdamOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
                                       learning_rate=1e-3)
  ```

  Args:
    l2_norm_clip, noise_multiplier, masks, expected_batch_size, noise_seed,
      num_microbatches, iterations, augmentation_multiplicity: as in
      `MaskedDPKerasSGDOptimizer`.
    learning_rate, beta_1, beta_2, epsilon, amsgrad, name, **kwargs: as in
      `keras.optimizers.legacy.Adam`.
  """

  def __init__(self, l2_norm_clip, noise_multiplier, masks=None, *,
               learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
               amsgrad=False, expected_batch_size=None, noise_seed=None,
               name="MaskedDPKerasAdamOptimizer", **kwargs):
    query, masks, state = dp_gradients.dp_arguments(
        l2_norm_clip, noise_multiplier, masks, expected_batch_size,
        noise_seed, kwargs)
    super().__init__(query, None, 1, learning_rate=learning_rate,
                     beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                     amsgrad=amsgrad, name=name, **kwargs)
    self._init_dp(masks, **state)

  def _masked_updates(self, grad, var, c):
    m, v = self.get_slot(var, "m"), self.get_slot(var, "v")
    m_new = c["beta_1_t"] * m + c["one_minus_beta_1_t"] * grad
    v_new = c["beta_2_t"] * v + c["one_minus_beta_2_t"] * tf.square(grad)
    updates = [(m, m_new), (v, v_new)]
    if self.amsgrad:
      vhat = self.get_slot(var, "vhat")
      v_new = tf.maximum(vhat, v_new)
      updates.append((vhat, v_new))
    # `lr` is bias-corrected: lr_t * sqrt(1 - beta_2^t) / (1 - beta_1^t).
    updates.append(
        (var, var - c["lr"] * m_new / (tf.sqrt(v_new) + c["epsilon"])))
    return updates

  def get_config(self):
    """As `MaskedDPKerasSGDOptimizer.get_config`."""
    config = keras.optimizers.legacy.Adam.get_config(self)
    config.update(self._dp_config())
    return config
