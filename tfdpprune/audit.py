"""Empirical privacy auditing: a lower bound on epsilon from a gradient canary.

An auditor who breaks the privacy claim wins a distinguishing game: train on
D or on D + canary, look at the released model, guess which. If some test
has true-positive rate TPR and false-positive rate FPR, (epsilon, delta)-DP
implies TPR <= e^epsilon * FPR + delta, so

    epsilon >= log((TPR - delta) / FPR)

(and the same with the complementary rates). `audit_optimizer` plays the game
with the strongest white-box canary (Nasr et al. 2021, "Adversary
Instantiation"; Nasr et al. 2023, "Tight Auditing of Differentially Private
Machine Learning"; Jagielski et al. 2020, "Auditing Differentially Private
Machine Learning: How Private is Private SGD?"): every example of D has a
zero gradient and the canary's gradient is a large spike on one coordinate
(a "Dirac canary"), so after clipping it moves that coordinate by exactly C
per step and only DP-SGD's noise hides it. It runs the real
`MaskedDPKerasSGDOptimizer` (fast path, secret noise) for `steps` full-batch
steps on D and on D + canary, `trials` times each; the statistic is the
canary coordinate's total movement. Half of the trials choose the threshold,
the other half give Clopper–Pearson bounds on TPR and FPR at the requested
confidence, and so a lower bound on epsilon that holds with that confidence.

With `masked_canary=True` the canary's coordinate is not selected (mask 0):
the optimizer must leak exactly nothing about it, and the bound is exactly 0.

```python
from tfdpprune import audit
result = audit.audit_optimizer(noise_multiplier=1.0, steps=1, trials=1000)
print(result.epsilon_lower_bound, result.epsilon)   # audit <= accountant
lower, upper = result                               # the two figures
```
"""

import dataclasses
import math
from typing import Iterator, Optional, Tuple

import numpy as np
from scipy import stats

from tfdpprune import accounting
from tfdpprune import frontends
from tfdpprune import private_training
from tfdpprune import pruning
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """An audit's lower bound next to the accountant's epsilon.

  Iterating gives `(epsilon_lower_bound, epsilon)`.

  Attributes:
    epsilon_lower_bound: the empirical lower bound (>= 0), valid with
      probability `confidence`.
    epsilon: the accountant's epsilon of the audited mechanism (full batch,
      `steps` steps), an upper bound.
    noise_multiplier, l2_norm_clip, steps, trials, delta, confidence,
    masked_canary: the audit's settings.
    threshold: the threshold on the canary statistic (in units of C).
    true_positive_rate, false_positive_rate: the held-out empirical rates.
  """
  epsilon_lower_bound: float
  epsilon: float
  noise_multiplier: float
  l2_norm_clip: float
  steps: int
  trials: int
  delta: float
  confidence: float
  masked_canary: bool
  threshold: float
  true_positive_rate: float
  false_positive_rate: float

  def __iter__(self) -> Iterator[float]:
    return iter((self.epsilon_lower_bound, self.epsilon))

  @property
  def accountant_epsilon(self) -> float:
    return self.epsilon


def _rate_bounds(positives: int, n: int, alpha: float) -> Tuple[float, float]:
  """One-sided Clopper–Pearson (lower, upper) bounds, each at level alpha."""
  lower = 0.0 if positives == 0 else float(
      stats.beta.ppf(alpha, positives, n - positives + 1))
  upper = 1.0 if positives == n else float(
      stats.beta.ppf(1 - alpha, positives + 1, n - positives))
  return lower, upper


def epsilon_lower_bound(true_positives: int, false_positives: int, n: int,
                        delta: float, confidence: float = 0.95) -> float:
  """The epsilon lower bound of a test with these counts (n trials each).

  Two-sided Clopper–Pearson intervals on TPR and FPR, each bound at level
  (1 - confidence) / 4, so that all four hold together with `confidence`. DP bounds both directions of
  the adjacency for the test's event and its complement; the best of the
  four inequalities counts, and 0 if none separates the worlds.
  """
  alpha = (1.0 - confidence) / 4.0
  tpr_lo, tpr_hi = _rate_bounds(true_positives, n, alpha)
  fpr_lo, fpr_hi = _rate_bounds(false_positives, n, alpha)
  best = 0.0
  for hit, miss in ((tpr_lo, fpr_hi), (fpr_lo, tpr_hi),
                    (1.0 - tpr_hi, 1.0 - fpr_lo), (1.0 - fpr_hi, 1.0 - tpr_lo)):
    if hit - delta > 0 and miss > 0:
      best = max(best, math.log((hit - delta) / miss))
  return best


def _best_threshold(without, with_canary, delta, confidence) -> float:
  """The threshold maximizing the bound on these (selection) trials."""
  values = np.unique(np.concatenate([without, with_canary]))
  # Midpoints between observed values (and beyond both ends), so that a
  # threshold never sits on a sample.
  candidates = np.concatenate([values[:1] - 1.0,
                               (values[1:] + values[:-1]) / 2.0,
                               values[-1:] + 1.0])
  best, best_tau = -1.0, float(candidates[0])
  n = len(without)
  for tau in candidates:
    eps = epsilon_lower_bound(int(np.sum(with_canary >= tau)),
                              int(np.sum(without >= tau)), n, delta,
                              confidence)
    if eps > best:
      best, best_tau = eps, float(tau)
  return best_tau


def _statistics(noise_multiplier, l2_norm_clip, steps, trials, masked_canary,
                batch_size, dimension, noise_seed, canary, keras_version=2):
  """The canary statistic of `trials` independent trainings (units of C)."""
  learning_rate = 1.0
  if keras_version == 3:
    step_fn, kernel = _keras3_step(noise_multiplier, l2_norm_clip,
                                   masked_canary, batch_size, dimension,
                                   noise_seed, learning_rate)
  else:
    step_fn, kernel = _keras2_step(noise_multiplier, l2_norm_clip,
                                   masked_canary, batch_size, dimension,
                                   noise_seed, learning_rate)
  # D: zero inputs, zero gradients. The canary: a spike of 10 C on
  # coordinate 0 under a linear loss, so its gradient (-10 C e_0) does not
  # depend on the weights and is clipped to exactly C.
  x = np.zeros([batch_size + int(canary), dimension], np.float32)
  y = np.zeros([batch_size + int(canary), 1], np.float32)
  if canary:
    x[-1, 0] = 10.0 * l2_norm_clip
    y[-1, 0] = 1.0
  x, y = tf.constant(x), tf.constant(y)

  def step():
    step_fn(x, y)

  step()  # eager warm-up: creates the optimizer's variables outside the loop

  @tf.function
  def run():
    out = tf.TensorArray(tf.float32, size=trials)
    for i in tf.range(trials):
      kernel.assign(tf.zeros_like(kernel))
      for _ in range(steps):
        step()
      out = out.write(i, kernel[0, 0])
    return out.stack()

  moved = run().numpy()
  return moved * batch_size / (learning_rate * l2_norm_clip)


def _canary_mask(shape):
  mask = np.ones(shape, np.float32)
  mask[0] = 0.0
  return mask


def _keras2_step(noise_multiplier, l2_norm_clip, masked_canary, batch_size,
                 dimension, noise_seed, learning_rate):
  """`(step(x, y), kernel)`: the Keras 2 optimizer on a linear model."""
  model = pruning.prune(keras.Sequential([
      keras.Input((dimension,)), keras.layers.Dense(1, use_bias=False)]))
  kernel = model.trainable_variables[0]
  masks = {kernel.ref(): _canary_mask(kernel.shape)} if masked_canary else None
  optimizer = MaskedDPKerasSGDOptimizer(
      l2_norm_clip, noise_multiplier, masks=masks,
      learning_rate=learning_rate, expected_batch_size=batch_size,
      noise_seed=noise_seed)

  def step(x, y):
    with tf.GradientTape() as tape:
      loss = -y[:, 0] * model(x, training=True)[:, 0]  # per example
    optimizer.minimize(loss, model.trainable_variables, tape=tape)
  return step, kernel


def _keras3_step(noise_multiplier, l2_norm_clip, masked_canary, batch_size,
                 dimension, noise_seed, learning_rate):
  """`(step(x, y), kernel)`: a Keras 3 private model's train step."""
  keras3 = frontends.keras3().keras
  model = pruning.prune(keras3.Sequential([
      keras3.Input((dimension,)), keras3.layers.Dense(1, use_bias=False)]))
  kernel = model.trainable_variables[0]
  if masked_canary:
    wrapper = pruning.wrappers(model)[0]
    wrapper.add_masks("freeze", ["kernel"], "weight")
    wrapper.freeze_masks["kernel"].assign(_canary_mask(kernel.shape))
  private = private_training.make_private(
      model, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      expected_batch_size=batch_size, noise_seed=noise_seed)
  private.compile(optimizer=keras3.optimizers.SGD(learning_rate),
                  loss=lambda y, p: -y[:, 0] * p[:, 0])  # per example

  def step(x, y):
    private.train_step((x, y))
  return step, kernel


def audit_optimizer(noise_multiplier: float, l2_norm_clip: float = 1.0,
                    steps: int = 1, trials: int = 1000,
                    masked_canary: bool = False, *, delta: float = 1e-5,
                    confidence: float = 0.95, batch_size: int = 8,
                    dimension: int = 16, accountant: str = "rdp",
                    noise_seed: Optional[int] = None,
                    keras_version: int = 2) -> AuditResult:
  """Audits the DP step with a white-box gradient canary: Keras 2's
  `MaskedDPKerasSGDOptimizer` or Keras 3's `tdp.make_private` train step
  (`keras_version=3`).

  Args:
    noise_multiplier: sigma >= 0 of the audited optimizer.
    l2_norm_clip: C > 0.
    steps: T >= 1 full-batch steps per training.
    trials: trainings per world (D and D + canary), >= 4; half choose the
      threshold, half measure. 1000 takes about 10 s per T on 2 CPU cores.
    masked_canary: put the canary on an unselected (masked) coordinate.
    delta: the delta of both figures.
    confidence: of the lower bound (Clopper–Pearson, two rates).
    batch_size: |D|, the zero-gradient examples (the divisor of the step).
    dimension: coordinates of the audited (linear) model.
    accountant: "rdp" or "pld", for the accountant's epsilon.
    noise_seed: None (secret noise, the default) or a seed for a
      reproducible audit.
    keras_version: 2 (the optimizer) or 3 (the private model's step).

  Returns:
    An `AuditResult`; `lower, upper = result` unpacks the two figures.
  """
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps={steps!r} must be an integer >= 1")
  if not (isinstance(trials, int) and trials >= 4):
    raise ValueError(f"trials={trials!r} must be an integer >= 4")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
  if not 0 < delta < 1:
    raise ValueError(f"delta={delta!r} must be in (0, 1)")
  if keras_version not in (2, 3):
    raise ValueError(f"keras_version={keras_version!r} must be 2 or 3")
  seeds = (None, None) if noise_seed is None else (noise_seed,
                                                   noise_seed + 1)
  args = (noise_multiplier, l2_norm_clip, steps, trials, masked_canary,
          batch_size, dimension)
  without = _statistics(*args, seeds[0], canary=False,
                        keras_version=keras_version)
  with_canary = _statistics(*args, seeds[1], canary=True,
                            keras_version=keras_version)
  half = trials // 2
  tau = _best_threshold(without[:half], with_canary[:half], delta, confidence)
  held_without, held_with = without[half:], with_canary[half:]
  n = len(held_without)
  tp, fp = int(np.sum(held_with >= tau)), int(np.sum(held_without >= tau))
  lower = epsilon_lower_bound(tp, fp, n, delta, confidence)
  upper = accounting.compute_epsilon(batch_size, batch_size, noise_multiplier,
                                     steps=steps, delta=delta,
                                     accountant=accountant)
  return AuditResult(
      epsilon_lower_bound=lower, epsilon=float(upper),
      noise_multiplier=float(noise_multiplier),
      l2_norm_clip=float(l2_norm_clip), steps=steps, trials=trials,
      delta=delta, confidence=confidence, masked_canary=masked_canary,
      threshold=tau, true_positive_rate=tp / n, false_positive_rate=fp / n)
