"""Dirichlet pruning: the VI's pieces, masks of whole units, public data only."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

import tfdpprune as tdp
from tfdpprune import data as data_lib
from tfdpprune import dirichlet
from tfdpprune import experiment
from tfdpprune import masks
from tfdpprune import pruning
from tfdpprune._compat import tf
from tfdpprune.config import TrainConfig

keras = tdp.keras


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((6,)),
      keras.layers.Dense(10, activation="relu", name="h1"),
      keras.layers.Dense(8, activation="relu", name="h2"),
      keras.layers.Dense(3, name="logits")])


def _data(n=64, seed=0, dim=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)).astype("float32")
  return x, np.argmax(x[:, :3], axis=1)


def _freeze_masks(model):
  return {w.layer.name: {r: m.numpy() for r, m in w.freeze_masks.items()}
          for w in pruning.wrappers(model) if w.freeze_masks}


def _xent():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


# -- the distribution ---------------------------------------------------------


def test_kl_divergence_matches_monte_carlo():
  alpha, prior = np.array([0.5, 2.0, 3.0]), 2.0
  rng = np.random.default_rng(0)
  phi = rng.dirichlet(alpha, size=200_000)
  phi = np.clip(phi, 1e-300, None)
  phi /= phi.sum(1, keepdims=True)
  log_ratio = (stats.dirichlet.logpdf(phi.T, alpha) -
               stats.dirichlet.logpdf(phi.T, [prior] * 3))
  mc, stderr = log_ratio.mean(), log_ratio.std() / np.sqrt(len(phi))
  kl = float(dirichlet.kl_divergence(alpha.astype("float32"), prior))
  assert abs(kl - mc) < 4 * stderr + 1e-3, (kl, mc, stderr)
  assert float(dirichlet.kl_divergence([2.0, 2.0, 2.0], 2.0)) == (
      pytest.approx(0.0, abs=1e-5))


def test_samples_have_dirichlet_mean_and_reparameterized_gradients():
  alpha = tf.constant([1.0, 2.0, 5.0])
  with tf.GradientTape() as tape:
    tape.watch(alpha)
    phi = dirichlet.sample(alpha, tf.constant([3, 4], tf.int64), 40_000)
    first = tf.reduce_mean(phi[:, 0])
  np.testing.assert_allclose(phi.numpy().sum(1), 1.0, rtol=1e-5)
  # E[phi] = alpha / 8; std of a mean of 40k draws of Beta(1, 7) ~ 0.0005.
  np.testing.assert_allclose(phi.numpy().mean(0), [1 / 8, 2 / 8, 5 / 8],
                             atol=0.003)
  # d E[phi_0] / d alpha = (a0 - a0_0) / a0^2 = (7/64, -1/64, -1/64).
  np.testing.assert_allclose(tape.gradient(first, alpha).numpy(),
                             [7 / 64, -1 / 64, -1 / 64], atol=0.01)


# -- masks ----------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["kernel", "all"])
def test_freezes_exact_fraction_of_whole_units_per_layer(weights):
  cfg = tdp.PruneConfig(method="dirichlet", sparsity=0.3, weights=weights)
  pm = tdp.prune(_mlp(), cfg, public_data=_data())
  found = _freeze_masks(pm)
  assert sorted(found) == ["h1", "h2"]  # the output layer is never pruned
  for name, units, pruned in [("h1", 10, 3), ("h2", 8, 2)]:  # 0.3*8 -> 2
    kernel = found[name]["kernel"]
    assert np.all(kernel == kernel[:1])  # whole units (output columns)
    assert int((kernel[0] == 0).sum()) == pruned
    if weights == "all":
      np.testing.assert_array_equal(found[name]["bias"], kernel[0])
    importance = masks.importances(pm)[name]
    assert importance.shape == (units,)
    assert importance.sum() == pytest.approx(1.0, rel=1e-5)
    # The pruned units are the least important ones.
    assert importance[kernel[0] == 0].max() <= importance[kernel[0] == 1].min()
  # pruned="zero" (default): the pruned units' kernels are zero.
  for w in pruning.wrappers(pm):
    if w.layer.name in found:
      off = found[w.layer.name]["kernel"] == 0
      assert np.all(w.layer.kernel.numpy()[off] == 0)


def test_global_scope_prunes_whole_units_across_layers():
  cfg = tdp.PruneConfig(method="dirichlet", sparsity=0.5, scope="global",
                        pruned="keep")
  pm = tdp.prune(_mlp(), cfg, public_data=_data())
  kernels = [m["kernel"] for m in _freeze_masks(pm).values()]
  for k in kernels:
    assert np.all(k == k[:1])
  pruned = sum(int((k == 0).sum()) for k in kernels)
  total = sum(k.size for k in kernels)  # 60 + 80 coordinates
  assert abs(pruned - 0.5 * total) <= 10  # one unit of h1 at most


def test_reads_only_public_data_and_depends_on_it(spy_dataset):
  x_pub, y_pub = _data(32, seed=1)
  x_priv, y_priv = _data(32, seed=2)
  public = spy_dataset(x_pub, y_pub, batch_size=8)
  private = spy_dataset(x_priv, y_priv, batch_size=8)
  cfg = tdp.PruneConfig(method="dirichlet", sparsity=0.5, pruned="keep",
                        dirichlet_epochs=2, public_batch_size=8)
  pm = tdp.prune(_mlp(), cfg, public_data=public.dataset)
  assert public.reads == 32 and private.reads == 0
  again = tdp.prune(_mlp(), cfg, public_data=(x_pub, y_pub))
  other = tdp.prune(_mlp(), cfg, public_data=(x_priv, y_priv))
  a, b, c = (masks.importances(m) for m in (pm, again, other))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not all(np.array_equal(a[n], c[n]) for n in a)
  before = _freeze_masks(pm)
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0), _xent())
  pm.fit(private.dataset, epochs=1, verbose=0)
  assert private.reads == 32  # training reads private data; pruning did not
  after = _freeze_masks(pm)
  for name in before:
    np.testing.assert_array_equal(before[name]["kernel"],
                                  after[name]["kernel"])


def test_trainer_masks_identical_for_different_private_data():
  digits = data_lib.load_dataset("digits")
  private_a, public = data_lib.split_public(digits, 0.2, seed=0)
  rng = np.random.default_rng(0)
  private_b = dataclasses.replace(
      private_a,
      x_train=rng.permutation(private_a.x_train)[::2],
      y_train=rng.integers(0, 10, len(private_a.x_train)).astype(
          private_a.y_train.dtype)[::2])
  config = TrainConfig(steps=1, public_fraction=0.2, prune=tdp.PruneConfig(
      method="dirichlet", sparsity=0.5))
  a = experiment.build_model(config, private_a, public)
  b = experiment.build_model(config, private_b, public)
  for (name, ma), mb in zip(_freeze_masks(a).items(),
                            _freeze_masks(b).values()):
    np.testing.assert_array_equal(ma["kernel"], mb["kernel"])
    np.testing.assert_array_equal(masks.importances(a)[name],
                                  masks.importances(b)[name])


@pytest.mark.parametrize("silent", ["zero_outgoing_weights",
                                    "constant_output"])
def test_unit_without_signal_ranks_lowest(silent):
  # x in R^3, label argmax(x). Hidden unit j < 3 is relu(x_j) and votes
  # for class j; unit 3 sees x_0 but its outgoing weights are zero, or its
  # output is a constant 1 that adds the same to every logit.
  model = keras.Sequential([keras.Input((3,)),
                            keras.layers.Dense(4, activation="relu",
                                               name="hidden"),
                            keras.layers.Dense(3, name="logits")])
  hidden_kernel = np.zeros((3, 4), "float32")
  hidden_kernel[[0, 1, 2], [0, 1, 2]] = 1.0
  hidden_bias = np.zeros(4, "float32")
  out_kernel = np.zeros((4, 3), "float32")
  out_kernel[[0, 1, 2], [0, 1, 2]] = 3.0
  if silent == "zero_outgoing_weights":
    hidden_kernel[0, 3] = 1.0
  else:
    hidden_bias[3] = 1.0
    out_kernel[3] = 2.0
  model.set_weights([hidden_kernel, hidden_bias, out_kernel,
                     np.zeros(3, "float32")])
  x, y = _data(256, seed=3, dim=3)
  for seed in (0, 1):
    cfg = tdp.PruneConfig(method="dirichlet", sparsity=0.25, seed=seed,
                          pruned="keep", dirichlet_epochs=3)
    pm = tdp.prune(model, cfg, public_data=(x, y))
    importance = masks.importances(pm)["hidden"]
    assert int(np.argmin(importance)) == 3, importance
    np.testing.assert_array_equal(
        pruning.wrappers(pm)[0].mask("kernel").numpy()[0], [1, 1, 1, 0])


def test_importances_saved_with_the_model_and_checkpoints(tmp_path):
  cfg = [tdp.PruneConfig(method="dirichlet", sparsity=0.5),
         tdp.PruneConfig(mode="select", sparsity=0.5, seed=1)]
  pm = tdp.prune(_mlp(), cfg, public_data=_data())
  found = masks.importances(pm)
  pm.save(str(tmp_path / "m.keras"))
  loaded = keras.models.load_model(str(tmp_path / "m.keras"))
  reloaded = masks.importances(loaded)
  assert sorted(reloaded) == sorted(found) == ["h1", "h2"]
  for name in found:
    np.testing.assert_array_equal(found[name], reloaded[name])
  for a, b in zip(pruning.wrappers(pm), pruning.wrappers(loaded)):
    for store in ("freeze_masks", "select_masks"):
      for role, mask in getattr(a, store).items():
        np.testing.assert_array_equal(mask, getattr(b, store)[role])
  path = tf.train.Checkpoint(model=pm).save(str(tmp_path / "ckpt"))
  other = tdp.prune(_mlp(), cfg, public_data=_data(seed=5))
  tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
  for name in found:
    np.testing.assert_array_equal(found[name],
                                  masks.importances(other)[name])


def test_layers_with_other_units_or_only_outputs_are_refused():
  with pytest.raises(ValueError, match="public_data"):
    tdp.prune(_mlp(), tdp.PruneConfig(method="dirichlet"))
  with pytest.raises(ValueError, match="outputs"):
    tdp.prune(_mlp(), tdp.PruneConfig(method="dirichlet", layers="logits"),
              public_data=_data())
  keras.utils.set_random_seed(0)
  depthwise = keras.Sequential([
      keras.Input((5, 5, 2)),
      keras.layers.DepthwiseConv2D(3, depth_multiplier=3, name="dw"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  x = np.random.default_rng(0).normal(size=(16, 5, 5, 2)).astype("float32")
  with pytest.raises(ValueError, match="'dw'.*6 outputs.*3 units"):
    tdp.prune(depthwise, tdp.PruneConfig(method="dirichlet"),
              public_data=(x, np.zeros(16, "int64")))
