"""Privacy accounting: epsilon against dp_accounting and closed forms."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize
from scipy import special
from scipy import stats

from tfdpprune import accounting

# dp_accounting's default RDP orders (restated here, not imported).
_ORDERS = ([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) +
           [128, 256, 512, 1024])
_INT_ORDERS = list(range(2, 64)) + [128, 256, 512, 1024]


def _direct(accountant, q, sigma, steps, delta):
  """Epsilon from a dp_accounting accountant, the event built here."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def _rdp_int(q, sigma, alpha):
  """RDP at integer order alpha of one Poisson-subsampled Gaussian step.

  Mironov, Talwar & Zhang (2019), Sec. 3.3: with A = sum_k C(alpha, k)
  (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)), RDP = log A / (alpha-1).
  """
  if q == 1:  # only the k = alpha term: the Gaussian's alpha / (2 sigma^2)
    return alpha / (2 * sigma**2)
  k = np.arange(alpha + 1)
  log_binom = (special.gammaln(alpha + 1) - special.gammaln(k + 1) -
               special.gammaln(alpha - k + 1))
  terms = (log_binom + (alpha - k) * np.log1p(-q) + k * np.log(q) +
           (k * k - k) / (2 * sigma**2))
  return special.logsumexp(terms) / (alpha - 1)


def _rdp_to_eps(rdp, alpha, delta, classic=False):
  """(eps, delta)-DP from RDP: classic (Mironov 2017, Prop. 3) or improved
  (Canonne, Kamath & Steinke 2020, Prop. 12) conversion."""
  if classic:
    return rdp - math.log(delta) / (alpha - 1)
  return rdp + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)


def _closed_form_eps(q, sigma, steps, delta, classic=False):
  return min(_rdp_to_eps(steps * _rdp_int(q, sigma, a), a, delta, classic)
             for a in _INT_ORDERS)


def _gaussian_exact_eps(mu, delta):
  """Exact epsilon of the Gaussian mechanism with mu = sensitivity / std.

  Balle & Wang (2018), Thm. 8: delta(eps) = Phi(-eps/mu + mu/2)
  - e^eps Phi(-eps/mu - mu/2).
  """
  def gap(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2) -
            math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
  return optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)


# (num_examples, batch_size, noise_multiplier, steps)
_SETTINGS = [
    (60000, 256, 1.1, 14063),  # TF Privacy MNIST tutorial, 60 epochs
    (1000, 10, 0.8, 500),
    (50000, 1, 0.5, 2000),
    (100, 100, 2.0, 10),  # q = 1: no subsampling
]


# -- epsilon ------------------------------------------------------------------


@pytest.mark.parametrize("n,b,sigma,steps", _SETTINGS)
def test_rdp_epsilon_equals_dp_accounting_rdp_accountant(n, b, sigma, steps):
  expected = _direct(dp_accounting.rdp.RdpAccountant(), b / n, sigma, steps,
                     1e-5)
  assert accounting.compute_epsilon(n, b, sigma, steps=steps) == expected


@pytest.mark.parametrize("n,b,sigma,steps",
                         [(1000, 10, 1.0, 100), (100, 100, 2.0, 10)])
def test_pld_epsilon_equals_dp_accounting_pld_accountant(n, b, sigma, steps):
  expected = _direct(dp_accounting.pld.PLDAccountant(), b / n, sigma, steps,
                     1e-5)
  got = accounting.compute_epsilon(n, b, sigma, steps=steps, accountant="pld")
  assert got == pytest.approx(expected, rel=1e-9)


def test_pld_is_tighter_than_rdp():
  # MNIST tutorial setting, 20 epochs: RDP 1.464, PLD 1.319 (computed).
  rdp = accounting.compute_epsilon(60000, 256, 1.1, epochs=20)
  pld = accounting.compute_epsilon(60000, 256, 1.1, epochs=20,
                                   accountant="pld")
  assert 0.8 * rdp < pld < rdp


@pytest.mark.parametrize("n,b,sigma,steps,close", [
    (60000, 256, 1.1, 14063, True),  # 2.5967 vs 2.5971
    (1000, 10, 0.8, 500, True),
    (100, 100, 2.0, 10, True),
    (50000, 1, 0.5, 2000, False),  # best order fractional: 1.98 vs 2.25
])
def test_rdp_epsilon_matches_integer_order_closed_form(n, b, sigma, steps,
                                                       close):
  # The closed form is optimized over the integer orders only, a subset of
  # the accountant's orders: an upper bound, and close unless the best order
  # is fractional.
  reference = _closed_form_eps(b / n, sigma, steps, 1e-5)
  got = accounting.compute_epsilon(n, b, sigma, steps=steps)
  assert got <= reference + 1e-12
  if close:
    assert got >= reference * 0.98


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (0.8, 4)])
def test_full_batch_epsilon_matches_gaussian_mechanism(sigma, steps):
  # q = 1: `steps` Gaussian steps are one Gaussian with mu = sqrt(steps)/sigma.
  # E.g. sigma = 1, one step: exact eps = 4.3772 (Balle & Wang); RDP = 4.7285.
  exact = _gaussian_exact_eps(math.sqrt(steps) / sigma, 1e-5)
  pld = accounting.compute_epsilon(10, 10, sigma, steps=steps,
                                   accountant="pld")
  assert pld == pytest.approx(exact, rel=1e-6)
  # RDP of a Gaussian step: alpha / (2 sigma^2), exactly.
  rdp_ref = min(_rdp_to_eps(steps * a / (2 * sigma**2), a, 1e-5)
                for a in _ORDERS)
  rdp = accounting.compute_epsilon(10, 10, sigma, steps=steps)
  assert rdp == pytest.approx(rdp_ref, rel=1e-12)
  assert rdp > exact  # RDP is an upper bound


@pytest.mark.parametrize("sigma,epochs,published", [
    (1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)])
def test_published_mnist_table_is_reproduced(sigma, epochs, published):
  # tensorflow/privacy tutorials/README.md, "Select Parameters" (N = 60000,
  # B = 256, delta = 1e-5): reported with the classic RDP conversion over
  # orders 1.1..10.9 and 12..63; the integer orders give 2.922, 9.774, 1.198.
  steps = accounting.steps_for(60000, 256, epochs)
  classic = _closed_form_eps(256 / 60000, sigma, steps, 1e-5, classic=True)
  assert classic == pytest.approx(published, abs=0.04)
  # The improved conversion used now is tighter than the published figure.
  assert accounting.compute_epsilon(60000, 256, sigma, epochs=epochs) < (
      published)


def test_epochs_and_steps_are_equivalent():
  assert accounting.compute_epsilon(1000, 10, 1.0, epochs=2) == (
      accounting.compute_epsilon(1000, 10, 1.0, steps=200))
  # 60 * 60000 / 256 = 14062.5 -> 14063 steps.
  assert accounting.steps_for(60000, 256, 60) == 14063
  assert accounting.compute_epsilon(60000, 256, 1.1, epochs=60) == (
      accounting.compute_epsilon(60000, 256, 1.1, steps=14063))
  # 1.1 * 100 / 10 = 11.000000000000002 in floating point: still 11 steps.
  assert accounting.steps_for(100, 10, 1.1) == 11
  assert accounting.steps_for(100, 30, 1.0) == 4  # 3.33 -> 4


def test_epsilon_increases_with_steps():
  eps = [accounting.compute_epsilon(1000, 10, 1.0, steps=s)
         for s in (1, 10, 100, 1000)]
  assert all(a < b for a, b in zip(eps, eps[1:]))


def test_epsilon_decreases_with_noise_multiplier():
  eps = [accounting.compute_epsilon(1000, 10, s, steps=100)
         for s in (0.5, 0.8, 1.0, 2.0)]
  assert all(a > b for a, b in zip(eps, eps[1:]))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_zero_noise_is_infinite_and_zero_steps_is_free(accountant):
  assert accounting.compute_epsilon(100, 10, 0.0, steps=5,
                                    accountant=accountant) == math.inf
  assert accounting.compute_epsilon(100, 10, 1.0, steps=0,
                                    accountant=accountant) == 0.0
  assert accounting.compute_epsilon(100, 10, 0.0, epochs=0,
                                    accountant=accountant) == 0.0


def test_privacy_spec_event_matches_the_dp_sgd_event():
  spec = accounting.PrivacySpec(1000, 10, 1.1)
  assert spec.dp_event(7) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.01, dp_accounting.GaussianDpEvent(1.1)), 7)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.delta = 0.1


# -- calibration and budgets --------------------------------------------------


@pytest.mark.parametrize("target,n,b,kwargs,accountant", [
    (1.0, 60000, 256, dict(epochs=10), "rdp"),
    (3.0, 60000, 256, dict(epochs=60), "rdp"),
    (8.0, 1000, 10, dict(steps=1000), "rdp"),
    (0.5, 100, 100, dict(steps=5), "rdp"),
    (2.0, 100, 100, dict(steps=4), "pld"),
])
def test_noise_calibration_round_trip(target, n, b, kwargs, accountant):
  sigma = accounting.compute_noise_multiplier(target, n, b, **kwargs,
                                              accountant=accountant)
  eps = accounting.compute_epsilon(n, b, sigma, **kwargs,
                                   accountant=accountant)
  assert eps <= target
  assert accounting.compute_epsilon(n, b, sigma * 0.99, **kwargs,
                                    accountant=accountant) > target
  if accountant == "rdp":  # the stated tolerance: 1e-4 relative
    assert accounting.compute_epsilon(n, b, sigma * (1 - 1e-4), **kwargs) > (
        target)


def test_pld_calibration_matches_exact_gaussian_noise():
  # q = 1, 4 steps: exact eps(sigma) of the Gaussian with mu = 2 / sigma
  # (Balle & Wang) equals 2.0 at sigma = 3.9877 (solved here).
  exact = optimize.brentq(
      lambda s: _gaussian_exact_eps(2 / s, 1e-5) - 2.0, 1.0, 10.0,
      xtol=1e-10)
  sigma = accounting.compute_noise_multiplier(2.0, 100, 100, steps=4,
                                              accountant="pld")
  assert sigma == pytest.approx(exact, rel=2e-4)


def test_noise_calibration_with_zero_steps_needs_no_noise():
  assert accounting.compute_noise_multiplier(1.0, 100, 10, steps=0) == 0.0


def test_unreachable_target_raises():
  # With delta = 1e-300 the RDP conversion alone costs ~0.667 (order 1024).
  with pytest.raises(ValueError, match="target_epsilon=0.1 is unreachable"):
    accounting.compute_noise_multiplier(0.1, 1000, 10, steps=100,
                                        delta=1e-300)


@pytest.mark.parametrize("target,sigma", [(1.0, 1.0), (3.0, 1.1), (5.0, 0.7)])
def test_max_steps_is_the_largest_step_count_within_target(target, sigma):
  m = accounting.compute_max_steps(target, 1000, 10, sigma)
  assert m >= 1
  assert accounting.compute_epsilon(1000, 10, sigma, steps=m) <= target
  assert accounting.compute_epsilon(1000, 10, sigma, steps=m + 1) > target


def test_max_steps_is_zero_without_noise():
  assert accounting.compute_max_steps(10.0, 1000, 10, 0.0) == 0


# -- validation ---------------------------------------------------------------

_VALID = dict(num_examples=1000, batch_size=10, noise_multiplier=1.0, steps=10)


@pytest.mark.parametrize("change,name", [
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=10.5), "num_examples"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=1001), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(noise_multiplier="1.0"), "noise_multiplier"),
    (dict(delta=1.5), "delta"),
    (dict(delta=0.0), "delta"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=None, epochs=-1.0), "epochs"),
    (dict(steps=None, epochs=float("inf")), "epochs"),
    (dict(epochs=1.0), "epochs"),  # both given
    (dict(steps=None), "epochs"),  # neither given
    (dict(accountant="gdp"), "accountant"),
])
def test_invalid_argument_raises_value_error_naming_it(change, name):
  kwargs = dict(_VALID, **change)
  with pytest.raises(ValueError, match=rf"\b{name}="):
    accounting.compute_epsilon(**kwargs)


def test_batch_size_error_states_the_allowed_range():
  with pytest.raises(ValueError,
                     match=r"batch_size=1001 must be an integer in "
                     r"\[1, num_examples=1000\]"):
    accounting.compute_epsilon(1000, 1001, 1.0, steps=1)
  with pytest.raises(ValueError, match=r"delta=1.5 must be in \(0, 1\)"):
    accounting.compute_epsilon(1000, 10, 1.0, steps=1, delta=1.5)


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf"), None])
def test_invalid_target_epsilon_raises_value_error_naming_it(target):
  with pytest.raises(ValueError, match=r"\btarget_epsilon="):
    accounting.compute_noise_multiplier(target, 1000, 10, steps=10)
  with pytest.raises(ValueError, match=r"\btarget_epsilon="):
    accounting.compute_max_steps(target, 1000, 10, 1.0)


def test_calibration_validates_its_other_arguments():
  with pytest.raises(ValueError, match=r"\bdelta="):
    accounting.compute_noise_multiplier(1.0, 1000, 10, steps=10, delta=2.0)
  with pytest.raises(ValueError, match=r"\baccountant="):
    accounting.compute_noise_multiplier(1.0, 1000, 10, steps=10,
                                        accountant="x")
