"""Privacy accounting of DP-SGD: epsilon, noise calibration, step budgets.

One step of DP-SGD with per-example clipping (one example per microbatch, so
no sensitivity doubling) and sampling rate q = batch_size / num_examples is
the Poisson-subsampled Gaussian mechanism; T steps are its T-fold composition:

  SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)

Epsilon comes from TF Privacy's analysis path (`AccountantType.RDP` or `PLD`
of `compute_dp_sgd_privacy_lib`, i.e. `dp_accounting`'s RDP or PLD
accountant) under add-or-remove-one-example adjacency, and covers the release
of every iterate, not only the final model. It assumes Poisson sampling; a
pipeline of fixed shuffled batches does not satisfy that assumption.

```python
from tfdpprune import accounting
eps = accounting.compute_epsilon(60000, 256, noise_multiplier=1.1, epochs=60)
sigma = accounting.compute_noise_multiplier(3.0, 60000, 256, epochs=60)
```
"""

import dataclasses
import functools
import math
import numbers
from typing import Optional

import dp_accounting
from scipy import optimize
from scipy import stats

from tfdpprune.core._tf import compute_dp_sgd_privacy_lib

ACCOUNTANTS = ("rdp", "pld")

_ACCOUNTANT_TYPES = {
    "rdp": compute_dp_sgd_privacy_lib.AccountantType.RDP,
    "pld": compute_dp_sgd_privacy_lib.AccountantType.PLD,
}
# Bisection limits: relative tolerance on sigma; the largest sigma tried
# (dp_accounting's RDP hits round-off errors from about 1e5); the largest step
# budget searched (a larger budget is reported as this).
_SIGMA_RTOL = 1e-4
_SIGMA_MAX = 1e4
_SIGMA_MIN = 1e-6
_STEPS_CAP = 2**40


# -- validation ---------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name, value, low, high=None, high_name=None):
  """Raises unless `value` is an integer in [low, high]."""
  if _is_int(value) and value >= low and (high is None or value <= high):
    return
  if high is None:
    allowed = f"an integer >= {low}"
  else:
    bound = f"{high_name}={high}" if high_name else str(high)
    allowed = f"an integer in [{low}, {bound}]"
  raise ValueError(f"{name}={value!r} must be {allowed}")


def _check_nonnegative(name, value):
  if not (_is_real(value) and math.isfinite(value) and value >= 0):
    raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def _check_positive(name, value):
  if not (_is_real(value) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name}={value!r} must be a finite number > 0")


def _check_delta(delta):
  if not (_is_real(delta) and 0 < delta < 1):
    raise ValueError(f"delta={delta!r} must be in (0, 1)")


def _check_accountant(accountant):
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant={accountant!r} must be one of "
                     f"{', '.join(map(repr, ACCOUNTANTS))}")


def _resolve_steps(num_examples, batch_size, epochs, steps) -> int:
  """The number of steps from exactly one of `epochs` / `steps`."""
  if (epochs is None) == (steps is None):
    raise ValueError("exactly one of epochs or steps must be given; got "
                     f"epochs={epochs!r}, steps={steps!r}")
  if steps is not None:
    _check_int("steps", steps, 0)
    return int(steps)
  return steps_for(num_examples, batch_size, epochs)


# -- the bundled privacy parameters -------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrivacySpec:
  """The parameters that, with a step count, determine DP-SGD's epsilon.

  Validated at construction; hashable, so epsilon values are cached per
  `(spec, steps)`.

  Attributes:
    num_examples: N >= 1, the size of the private training set.
    batch_size: B in [1, N], the (expected) batch size; q = B / N.
    noise_multiplier: sigma >= 0, noise std over the L2 clip norm.
    delta: in (0, 1).
    accountant: "rdp" (Renyi DP, TF Privacy's default) or "pld" (privacy loss
      distributions: tighter, slower).
    max_batch_size: None, or a cap that truncates larger Poisson batches to a
      uniformly random subset (`tdp.poisson_dataset(max_batch_size=...)`).
      Truncated sampling is not Poisson sampling; it equals it except when a
      batch is truncated, which happens in a step with probability
      p = P(Binomial(N + 1, q) > cap) (N + 1: the larger neighbouring data
      set). So T steps are (eps, delta)-DP with eps computed by the
      accountant at delta - delta_T, where
      delta_T = (1 + e^eps') * T * p and eps' = the accountant's eps at
      delta / 2 (an upper bound on eps; `truncation_delta`). If delta_T >
      delta / 2 there is no such guarantee: epsilon is inf.

  Example:
    >>> spec = PrivacySpec(60000, 256, noise_multiplier=1.1)
    >>> spec.epsilon(steps_for(60000, 256, epochs=60))  # doctest: +ELLIPSIS
    2.59...
  """
  num_examples: int
  batch_size: int
  noise_multiplier: float
  delta: float = 1e-5
  accountant: str = "rdp"
  max_batch_size: Optional[int] = None

  def __post_init__(self):
    _check_int("num_examples", self.num_examples, 1)
    if self.max_batch_size is not None:
      _check_int("max_batch_size", self.max_batch_size, 1)
    _check_int("batch_size", self.batch_size, 1, self.num_examples,
               "num_examples")
    _check_nonnegative("noise_multiplier", self.noise_multiplier)
    _check_delta(self.delta)
    _check_accountant(self.accountant)
    object.__setattr__(self, "num_examples", int(self.num_examples))
    object.__setattr__(self, "batch_size", int(self.batch_size))
    object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
    object.__setattr__(self, "delta", float(self.delta))

  @property
  def sampling_probability(self) -> float:
    """q = batch_size / num_examples."""
    return self.batch_size / self.num_examples

  def dp_event(self, steps: int) -> dp_accounting.DpEvent:
    """The `dp_accounting` event of `steps` DP-SGD steps (steps >= 1)."""
    _check_int("steps", steps, 1)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            self.sampling_probability,
            dp_accounting.GaussianDpEvent(self.noise_multiplier)),
        int(steps))

  def epsilon(self, steps: int) -> float:
    """Epsilon after `steps` steps (0.0 for 0 steps, inf for sigma = 0)."""
    _check_int("steps", steps, 0)
    return _epsilon(self, int(steps))

  def truncation_delta(self, steps: int) -> float:
    """delta_T, the part of delta that `steps` truncated steps spend
    (0.0 without `max_batch_size`; see the class doc)."""
    _check_int("steps", steps, 0)
    if self.max_batch_size is None or steps == 0:
      return 0.0
    p = poisson_truncation_probability(self.num_examples + 1,
                                       self.sampling_probability,
                                       self.max_batch_size)
    if p == 0.0:
      return 0.0
    half = dataclasses.replace(self, delta=self.delta / 2,
                               max_batch_size=None).epsilon(steps)
    if half > 700:  # e^eps overflows: no useful bound
      return math.inf
    return (1.0 + math.exp(half)) * steps * p

  def max_steps(self, target_epsilon: float) -> int:
    """The largest step count whose epsilon is <= `target_epsilon`.

    Bisection over integer steps (epsilon is non-decreasing in steps). A
    budget larger than 2**40 steps is reported as 2**40.
    """
    _check_positive("target_epsilon", target_epsilon)
    if self.epsilon(1) > target_epsilon:
      return 0
    lo, hi = 1, 2  # epsilon(lo) <= target; hi is the next candidate
    while self.epsilon(hi) <= target_epsilon:
      if hi >= _STEPS_CAP:
        return _STEPS_CAP
      lo, hi = hi, min(2 * hi, _STEPS_CAP)
    while hi - lo > 1:  # epsilon(lo) <= target < epsilon(hi)
      mid = (lo + hi) // 2
      if self.epsilon(mid) <= target_epsilon:
        lo = mid
      else:
        hi = mid
    return lo


@functools.lru_cache(maxsize=4096)
def _epsilon(spec: PrivacySpec, steps: int) -> float:
  """Epsilon of a validated spec after `steps` >= 0 steps (cached)."""
  if steps == 0:
    return 0.0
  if spec.noise_multiplier == 0:
    return math.inf
  if spec.max_batch_size is not None:
    spent = spec.truncation_delta(steps)
    if spent > spec.delta / 2:
      return math.inf
    return _epsilon(dataclasses.replace(spec, delta=spec.delta - spent,
                                        max_batch_size=None), steps)
  accountant = _ACCOUNTANT_TYPES[spec.accountant].get_accountant()
  accountant.compose(spec.dp_event(steps))
  return float(accountant.get_epsilon(spec.delta))


# -- public functions ---------------------------------------------------------


def poisson_truncation_probability(num_examples: int,
                                   sampling_probability: float,
                                   max_batch_size: int) -> float:
  """P(Binomial(num_examples, q) > max_batch_size): one step's truncation."""
  return float(stats.binom.sf(max_batch_size, num_examples,
                              sampling_probability))


def poisson_capacity(num_examples: int, sampling_probability: float,
                     tail: float = 1e-12, multiple: int = 1) -> int:
  """The smallest batch capacity (a multiple of `multiple`) that a Poisson
  batch of the larger neighbouring data set (N + 1 examples) exceeds with
  probability below `tail`: a static shape whose truncation costs little
  delta (`PrivacySpec.max_batch_size` accounts it).

  Example:
    >>> poisson_capacity(60000, 256 / 60000)   # mean 256, sd 16
    376
  """
  _check_int("num_examples", num_examples, 1)
  _check_int("multiple", multiple, 1)
  if not 0 < tail < 1:
    raise ValueError(f"tail={tail!r} must be in (0, 1)")
  cap = int(stats.binom.isf(tail, num_examples + 1, sampling_probability))
  while poisson_truncation_probability(num_examples + 1,
                                       sampling_probability, cap) >= tail:
    cap += 1
  cap = max(cap, 1)
  return -(-cap // multiple) * multiple


def steps_for(num_examples: int, batch_size: int, epochs: float) -> int:
  """ceil(epochs * num_examples / batch_size), the steps of `epochs` epochs.

  A product within 1e-9 (relative) of an integer counts as that integer, so
  floating-point noise in fractional `epochs` does not add a step.

  Example:
    >>> steps_for(60000, 256, epochs=60)  # 14062.5 -> 14063
    14063
  """
  _check_int("num_examples", num_examples, 1)
  _check_int("batch_size", batch_size, 1, num_examples, "num_examples")
  _check_nonnegative("epochs", epochs)
  exact = epochs * num_examples / batch_size
  nearest = round(exact)
  if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
    return int(nearest)
  return int(math.ceil(exact))


def compute_epsilon(num_examples: int,
                    batch_size: int,
                    noise_multiplier: float,
                    epochs: Optional[float] = None,
                    steps: Optional[int] = None,
                    delta: float = 1e-5,
                    accountant: str = "rdp") -> float:
  """Epsilon of DP-SGD with Poisson sampling, at the given delta.

  Args:
    num_examples: N >= 1, the size of the private training set.
    batch_size: B in [1, N]; the sampling rate is q = B / N.
    noise_multiplier: sigma >= 0 (sigma = 0 gives inf).
    epochs: passes over the data; steps = ceil(epochs * N / B). Give exactly
      one of `epochs` and `steps`.
    steps: the number of DP-SGD steps (0 gives 0.0).
    delta: in (0, 1).
    accountant: "rdp" or "pld".

  Returns:
    Epsilon (a float; inf if sigma = 0 and steps > 0).

  Raises:
    ValueError: naming the argument, if any argument is out of range.

  Example:
    >>> round(compute_epsilon(60000, 256, 1.1, epochs=60), 2)
    2.6
  """
  spec = PrivacySpec(num_examples, batch_size, noise_multiplier, delta,
                     accountant)
  return spec.epsilon(_resolve_steps(num_examples, batch_size, epochs, steps))


def compute_noise_multiplier(target_epsilon: float,
                             num_examples: int,
                             batch_size: int,
                             epochs: Optional[float] = None,
                             steps: Optional[int] = None,
                             delta: float = 1e-5,
                             accountant: str = "rdp",
                             max_batch_size: Optional[int] = None) -> float:
  """The smallest noise multiplier whose epsilon is <= `target_epsilon`.

  Root finding on sigma (Brent's method, then bisection) to a relative
  tolerance of 1e-4, rounded up: the value returned meets the target, and
  sigma * (1 - 1e-4) does not.

  Args:
    target_epsilon: the epsilon to reach, > 0.
    num_examples, batch_size, epochs, steps, delta, accountant: as in
      `compute_epsilon`.
    max_batch_size: a cap truncating the Poisson batches (static shapes),
      whose cost is added to delta (`PrivacySpec.max_batch_size`).

  Returns:
    sigma >= 0 (0.0 when steps = 0).

  Raises:
    ValueError: if an argument is out of range, or the target is unreachable
      (even sigma = 1e4 gives a larger epsilon, e.g. for a tiny delta).

  Example:
    >>> sigma = compute_noise_multiplier(3.0, 60000, 256, epochs=60)
    >>> compute_epsilon(60000, 256, sigma, epochs=60) <= 3.0
    True
  """
  _check_positive("target_epsilon", target_epsilon)
  total = _resolve_steps(num_examples, batch_size, epochs, steps)

  def eps(sigma):
    return PrivacySpec(num_examples, batch_size, sigma, delta, accountant,
                       max_batch_size=max_batch_size).epsilon(total)

  eps(1.0)  # validates the remaining arguments
  if total == 0:
    return 0.0
  # Bracket: eps(lo) > target >= eps(hi).
  hi = 1.0
  if eps(hi) <= target_epsilon:
    lo = hi / 2
    while eps(lo) <= target_epsilon:
      hi, lo = lo, lo / 2
      if lo < _SIGMA_MIN:
        return hi
  else:
    lo = hi
    while eps(hi) > target_epsilon:
      if hi >= _SIGMA_MAX:
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is unreachable: even "
            f"noise_multiplier={hi:g} gives epsilon={eps(hi):.4g} with "
            f"num_examples={num_examples}, batch_size={batch_size}, "
            f"steps={total}, delta={delta!r}, accountant={accountant!r}")
      lo, hi = hi, min(hi * 2, _SIGMA_MAX)
  # Brent's method finds the root fast (PLD evaluations are slow); every
  # evaluation also narrows the bracket, and bisection finishes it, so the
  # result meets the target and sigma * (1 - rtol) does not.
  bracket = [lo, hi]

  def gap(sigma):
    e = eps(sigma)
    if e <= target_epsilon:
      bracket[1] = min(bracket[1], sigma)
    else:
      bracket[0] = max(bracket[0], sigma)
    return e - target_epsilon

  root = optimize.brentq(gap, lo, hi, xtol=_SIGMA_RTOL * lo / 4,
                         rtol=_SIGMA_RTOL / 4)
  for sigma in (root * (1 + _SIGMA_RTOL / 3), root * (1 - _SIGMA_RTOL / 3)):
    if bracket[0] < sigma < bracket[1]:
      gap(sigma)
  while bracket[1] - bracket[0] > _SIGMA_RTOL * bracket[1]:
    gap((bracket[0] + bracket[1]) / 2)
  return bracket[1]


def compute_max_steps(target_epsilon: float,
                      num_examples: int,
                      batch_size: int,
                      noise_multiplier: float,
                      delta: float = 1e-5,
                      accountant: str = "rdp") -> int:
  """The largest number of steps whose epsilon is <= `target_epsilon`.

  Args:
    target_epsilon: the budget, > 0.
    num_examples, batch_size, noise_multiplier, delta, accountant: as in
      `compute_epsilon`.

  Returns:
    The step budget (0 if even one step exceeds it, e.g. sigma = 0; at most
    2**40).

  Example:
    >>> compute_max_steps(3.0, 60000, 256, noise_multiplier=1.1)
    18338
  """
  return PrivacySpec(num_examples, batch_size, noise_multiplier, delta,
                     accountant).max_steps(target_epsilon)
