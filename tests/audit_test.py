"""The audit's lower bound: below the accountant, catches broken noise,
exactly 0 for a masked canary; Clopper–Pearson arithmetic by hand."""

import math

import pytest

from tfdpprune import audit


def test_bound_from_counts_matches_hand_computation():
  # 500/500 detections and 0/500 false alarms at 95% (1.25% for each of the
  # four one-sided bounds): TPR >= 0.0125^(1/500), FPR <= 1 - that.
  tpr = 0.0125 ** (1 / 500)
  expected = math.log((tpr - 1e-5) / (1 - tpr))
  assert audit.epsilon_lower_bound(500, 0, 500, 1e-5) == pytest.approx(
      expected, rel=1e-6)
  assert audit.epsilon_lower_bound(250, 250, 500, 1e-5) == 0.0
  assert audit.epsilon_lower_bound(0, 500, 500, 1e-5) == pytest.approx(
      expected, rel=1e-6)  # the complementary test


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_lower_bound_is_below_the_accountant(sigma):
  result = audit.audit_optimizer(sigma, l2_norm_clip=1.0, steps=1,
                                 trials=1000)
  lower, upper = result
  assert 0.0 <= lower <= upper
  assert upper == result.epsilon


def test_broken_noise_is_caught():
  result = audit.audit_optimizer(0.01, trials=1000)
  assert result.epsilon_lower_bound > 3.0
  assert result.true_positive_rate == 1.0
  assert result.false_positive_rate == 0.0


def test_masked_canary_leaks_exactly_nothing():
  # Even with almost no noise, a canary on an unselected coordinate moves
  # nothing in either world.
  for sigma in (0.01, 1.0):
    result = audit.audit_optimizer(sigma, trials=200, masked_canary=True)
    assert result.epsilon_lower_bound == 0.0


def test_steps_add_up_and_bad_arguments_are_refused():
  result = audit.audit_optimizer(0.01, steps=3, trials=100)
  assert result.epsilon_lower_bound > 2.0 and result.steps == 3
  with pytest.raises(ValueError, match="trials"):
    audit.audit_optimizer(1.0, trials=2)
  with pytest.raises(ValueError, match="steps"):
    audit.audit_optimizer(1.0, steps=0)


def test_keras3_step_audits_like_the_optimizer():
  broken = audit.audit_optimizer(0.01, trials=400, keras_version=3)
  assert broken.epsilon_lower_bound > 3.0
  sound = audit.audit_optimizer(1.0, trials=400, keras_version=3)
  assert 0.0 <= sound.epsilon_lower_bound <= sound.epsilon
  masked = audit.audit_optimizer(0.01, trials=200, masked_canary=True,
                                 keras_version=3)
  assert masked.epsilon_lower_bound == 0.0
