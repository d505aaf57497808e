"""Secret and public randomness: keys, domain separation, mask independence."""

import numpy as np
import pytest
from scipy import stats

import tfdpprune as tdp
from tfdpprune import data
from tfdpprune import masks
from tfdpprune import randomness
from tfdpprune._compat import tf


def test_secret_keys_are_fresh_and_derived_keys_reproducible():
  assert randomness.secret_key() != randomness.secret_key()
  assert randomness.private_key(randomness.NOISE) != randomness.private_key(
      randomness.NOISE)
  assert randomness.derived_key(3, "noise") == randomness.derived_key(3,
                                                                      "noise")
  assert randomness.private_key(randomness.SAMPLING, 3) == (
      randomness.derived_key(3, randomness.SAMPLING))
  for key in (randomness.secret_key(), randomness.derived_key(0, "x")):
    assert all(-2**63 <= k < 2**63 for k in key)


def test_purposes_have_unrelated_streams_for_the_same_seed():
  keys = {p: randomness.derived_key(0, p)
          for p in (randomness.NOISE, randomness.SAMPLING, randomness.MASKS)}
  assert len(set(keys.values())) == 3
  draws = [tf.random.stateless_uniform([1000], randomness.step_seed(k, 0))
           for k in keys.values()]
  for a in draws:
    for b in draws:
      if a is not b:
        assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.15


def test_step_seed_differs_per_draw_and_keeps_both_key_words():
  key = (12345, -6789)
  seeds = {tuple(randomness.step_seed(key, i, j).numpy())
           for i in range(5) for j in range(5)}
  assert len(seeds) == 25
  # Changing either key word changes the stream.
  base = tf.random.stateless_uniform([8], randomness.step_seed(key, 1))
  for other in ((12346, -6789), (12345, -6788)):
    assert not np.array_equal(
        base, tf.random.stateless_uniform([8], randomness.step_seed(other, 1)))


def _independence_pvalue(mask_fn, sampled_fn, n, steps):
  """Chi-square test (two-sided) that mask bits and sampling are unrelated."""
  table = np.zeros((2, 2))
  for t in range(steps):
    m = mask_fn(t).astype(int)
    s = sampled_fn(t).astype(int)
    for a in (0, 1):
      for b in (0, 1):
        table[a, b] += np.sum((m == a) & (s == b))
  return stats.chi2_contingency(table).pvalue, table


def test_random_select_masks_are_independent_of_poisson_sampling():
  # The worst case of the old code: --seed, --prune_seed and the sampling
  # seed all equal (0), a select mask re-drawn every step (k = 1), one mask
  # coordinate per example.
  n, q, steps = 2000, 0.2, 20
  variable = tf.Variable(tf.zeros([n]))
  config = tdp.PruneConfig(mode="select", sparsity=0.5, seed=0)

  def mask(t):
    return masks.compute_masks(config, [variable], draw=t)[0].numpy() > 0

  def sampled(t):
    s = np.zeros(n, bool)
    s[data.poisson_selection(n, q, 0, t).numpy()] = True  # seed 0's batches
    return s

  p, table = _independence_pvalue(mask, sampled, n, steps)
  assert p > 1e-3, table
  # Secret sampling (the default): independent as well.
  secret = randomness.secret_key()
  p, table = _independence_pvalue(
      mask, lambda t: np.isin(np.arange(n), data.poisson_selection(
          n, q, secret, t).numpy()), n, steps)
  assert p > 1e-3, table

  # The test has power: the old scheme (mask scores and sampling uniforms
  # from the same Philox stream keyed (seed, step)) is caught at once.
  def old_uniforms(t):
    return tf.random.stateless_uniform([n], seed=[0, t], alg="philox").numpy()
  p, table = _independence_pvalue(
      lambda t: old_uniforms(t) >= np.median(old_uniforms(t)),
      lambda t: old_uniforms(t) < q, n, steps)
  assert p < 1e-10 and table[1, 1] == 0


@pytest.mark.parametrize("purpose", ["noise", "masks", ""])
def test_private_key_refuses_other_purposes(purpose):
  if purpose == "noise":
    assert randomness.private_key(purpose, 1) == randomness.derived_key(1,
                                                                        purpose)
  else:
    with pytest.raises(ValueError, match="purpose"):
      randomness.private_key(purpose)
