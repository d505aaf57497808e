"""The Gaussian mechanism of one DP-SGD step over selected coordinates.

Given every example's squared norm over the selected coordinates and the
clipped sums, one step releases, per variable,

    (sum_i c_i (g_i * m) + N(0, sigma^2 C^2) * m) / B

with c_i = C / max(||g_i * m||, C) (0 if the example's norm or loss is not
finite), noise on selected coordinates only and drawn once per global step
(with R replicas only replica 0 adds it, so the all-reduced sum carries
exactly one draw), and B the *expected* batch size under Poisson sampling:
the realized size of a Poisson batch is private, and dividing by it would
release it. The noise is keyed by a secret key, the step and the variable's
index, so it is never reused and never stored.
"""

import dataclasses
from typing import List, Optional, Sequence

from tfdpprune.core import randomness
from tfdpprune.core._tf import tf


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """The public parameters of the mechanism.

  Attributes:
    l2_norm_clip: C > 0, the joint L2 clip of an example's selected
      coordinates.
    noise_multiplier: sigma >= 0.
    expected_batch_size: B, the denominator; None divides by the realized
      batch size (right only for fixed-size batches).
  """
  l2_norm_clip: float
  noise_multiplier: float
  expected_batch_size: Optional[float] = None

  def __post_init__(self):
    if not self.l2_norm_clip > 0:
      raise ValueError(f"l2_norm_clip={self.l2_norm_clip!r} must be > 0")
    if not self.noise_multiplier >= 0:
      raise ValueError(f"noise_multiplier={self.noise_multiplier!r} must be "
                       ">= 0")
    if self.expected_batch_size is not None and not (
        self.expected_batch_size > 0):
      raise ValueError(f"expected_batch_size={self.expected_batch_size!r} "
                       "must be > 0 or None")

  def coefficients(self, sq_norms, example_losses):
    """`(c [B], finite [B])`: clip coefficients, 0 for an example whose norm
    or loss is not finite (a NaN would survive `C / max(NaN, C)`)."""
    norms = tf.sqrt(sq_norms)
    clip = tf.constant(self.l2_norm_clip, norms.dtype)
    finite = tf.math.is_finite(norms) & tf.math.is_finite(
        tf.cast(example_losses, norms.dtype))
    coef = tf.where(finite, clip / tf.maximum(norms, clip),
                    tf.zeros_like(norms))
    return coef, finite

  def denominator(self, batch_size, replica=None) -> tf.Tensor:
    """B (expected), else the realized global batch size."""
    if self.expected_batch_size:
      return tf.constant(float(self.expected_batch_size))
    if replica is not None:  # the global batch of this step
      return replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.cast(batch_size, tf.float32))
    return tf.cast(batch_size, tf.float32)

  def privatize(self, sums: Sequence[Optional[tf.Tensor]],
                variables: Sequence[object],
                masks: Sequence[Optional[tf.Tensor]],
                excluded: Sequence[bool], *, noise_key, step,
                batch_size, replica=None) -> List[tf.Tensor]:
    """The released gradient of each variable.

    Args:
      sums: the clipped sum of each variable (None: selected but unconnected
        to the loss, i.e. zero).
      variables: the variables, in the order that indexes their noise.
      masks: each variable's selection mask (None: fully selected).
      excluded: variables left out entirely (gradient exactly 0, no noise).
      noise_key: the secret noise key (a variable or tensor `[2]` int64).
      step: the global step, keying the noise.
      batch_size: the realized batch size (used only without an expected
        one).
      replica: the replica context of a multi-replica step, or None.
    """
    denominator = self.denominator(batch_size, replica)
    gate = (1.0 if replica is None else tf.cast(
        tf.equal(replica.replica_id_in_sync_group, 0), tf.float32))
    grads = []
    for index, (total, var, mask, skip) in enumerate(
        zip(sums, variables, masks, excluded)):
      dtype = tf.as_dtype(var.dtype)
      if skip:
        grads.append(tf.zeros(var.shape, dtype))
        continue
      total = (tf.zeros(var.shape, dtype) if total is None else
               tf.cast(total, dtype))
      noise = tf.random.stateless_normal(
          tf.shape(total), randomness.step_seed(noise_key, step, index),
          stddev=self.l2_norm_clip * self.noise_multiplier,
          dtype=dtype) * tf.cast(gate, dtype)
      if mask is not None:
        noise = noise * tf.cast(mask, dtype)
      grads.append((total + noise) / tf.cast(denominator, dtype))
    return grads


def replica_context():
  """The replica context of a multi-replica step, or None."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return None
  return ctx
