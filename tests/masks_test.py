"""Pruning for DP: PruneConfig, mask strategies, freeze and select modes."""

import numpy as np
import pytest

import tfdpprune as tdp
from tfdpprune import masks
from tfdpprune import public
from tfdpprune import pruning
from tfdpprune import randomness
from tfdpprune._compat import tf

keras = tdp.keras


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((10,)),
                           keras.layers.Dense(10, activation="relu",
                                              name="hidden"),
                           keras.layers.Dense(10, name="logits")])


def _cnn(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((6, 6, 1)),
      keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(8, activation="relu"),
      keras.layers.Dense(3)])


def _xent():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


def _data(n=16, seed=0, shape=(6, 6, 1)):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n,) + shape).astype("float32"),
          rng.integers(0, 3, size=n))


def _kernel_masks(model):
  return [w.mask(r).numpy() for w in pruning.wrappers(model)
          for r in ("kernel",) if w.mask(r) is not None]


# -- config -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(mode="prune"), "mode"),
    (dict(method="snip"), "method"),
    (dict(scope="local"), "scope"),
    (dict(granularity="block"), "granularity"),
    (dict(granularity="layer", scope="per_layer"), "granularity"),
    (dict(mode="select", every_k_steps=0), "every_k_steps"),
    (dict(mode="select", pruned="zero"), "pruned"),
    (dict(mode="freeze", pruned="drop"), "pruned"),
    (dict(mode="freeze", every_k_steps=2), "every_k_steps"),
    (dict(mode="select", method="dirichlet"), "method"),
    (dict(method="dirichlet", granularity="weight"), "granularity"),
    (dict(method="dirichlet", dirichlet_epochs=0), "dirichlet_epochs"),
    (dict(method="dirichlet", dirichlet_prior=-1.0), "dirichlet_prior"),
    (dict(method="dirichlet", dirichlet_learning_rate=float("nan")),
     "dirichlet_learning_rate"),
    (dict(method="random", dirichlet_prior=1.0), "dirichlet_prior"),
    (dict(method="public_gradient", public_batch_size=32),
     "public_batch_size"),
    (dict(mode="select", method="public_saliency", public_batch_size=0),
     "public_batch_size"),
    (dict(mode="select", sparsity_schedule=((5, 0.5), (2, 0.9))),
     "sparsity_schedule"),
    (dict(layers="(unclosed"), "layers"),
])
def test_bad_config_fails_at_construction_naming_field(kwargs, field):
  with pytest.raises(ValueError, match=f"PruneConfig.{field}="):
    tdp.PruneConfig(**kwargs)


def test_config_is_frozen():
  cfg = tdp.PruneConfig()
  with pytest.raises(Exception):
    cfg.sparsity = 0.5  # pytype: disable=not-writable


# -- sparsity ---------------------------------------------------------------


@pytest.mark.parametrize("scope,granularity,expected_zeros", [
    ("per_layer", "weight", [30, 30]),   # 0.3 of 100 coordinates per kernel
    ("per_layer", "neuron", [30, 30]),   # 3 of 10 neurons (10 coords each)
    ("global", "weight", None),          # 60 of 200 coordinates in total
    ("global", "neuron", None),          # 6 of 20 neurons in total
])
def test_exact_sparsity_for_scope_and_granularity(scope, granularity,
                                                  expected_zeros):
  cfg = tdp.PruneConfig(sparsity=0.3, scope=scope, granularity=granularity,
                        pruned="keep")
  model = tdp.prune(_mlp(), cfg)
  zeros = [int((m == 0).sum()) for m in _kernel_masks(model)]
  if expected_zeros is not None:
    assert zeros == expected_zeros
  assert sum(zeros) == 60
  if granularity == "neuron":  # whole output columns
    for m in _kernel_masks(model):
      assert np.all((m == m[:1]))


def test_exact_sparsity_for_layer_granularity():
  cfg = tdp.PruneConfig(sparsity=0.5, scope="global", granularity="layer")
  model = tdp.prune(_mlp(), cfg)
  ms = _kernel_masks(model)
  assert sorted(float(m.mean()) for m in ms) == [0.0, 1.0]


def test_biases_stay_trained_unless_configured():
  model = tdp.prune(_mlp(), tdp.PruneConfig(sparsity=0.5))
  for w in pruning.wrappers(model):
    assert w.mask("bias") is None
  model = tdp.prune(_mlp(), tdp.PruneConfig(sparsity=0.5, weights="all"))
  for w in pruning.wrappers(model):
    assert float(tf.reduce_mean(w.mask("bias"))) == 0.5


def test_layers_regex_limits_eligible_layers():
  model = tdp.prune(_mlp(), tdp.PruneConfig(sparsity=0.5, layers="^hid"))
  names = [w.layer.name for w in pruning.wrappers(model)
           if w.mask("kernel") is not None]
  assert names == ["hidden"]


# -- methods ----------------------------------------------------------------


def test_random_masks_reproducible_by_seed_and_differ_across_draws():
  cfg = tdp.PruneConfig(sparsity=0.5, seed=7, pruned="keep")
  a = _kernel_masks(tdp.prune(_mlp(), cfg))
  b = _kernel_masks(tdp.prune(_mlp(seed=3), cfg))
  c = _kernel_masks(tdp.prune(_mlp(), tdp.PruneConfig(sparsity=0.5, seed=8)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  variables = _mlp().trainable_variables[::2]
  sel = tdp.PruneConfig(mode="select", sparsity=0.5, seed=7)
  d0 = masks.compute_masks(sel, variables, draw=0)
  d0_again = masks.compute_masks(sel, variables, draw=0)
  d1 = masks.compute_masks(sel, variables, draw=1)
  assert all(np.array_equal(x, y) for x, y in zip(d0, d0_again))
  assert not all(np.array_equal(x, y) for x, y in zip(d0, d1))


def test_magnitude_keeps_the_largest_weights():
  model = _mlp(seed=2)
  weights = [v.numpy().copy() for v in model.trainable_variables[::2]]
  pm = tdp.prune(model, tdp.PruneConfig(method="magnitude", sparsity=0.7,
                                        pruned="keep"))
  for w, m in zip(weights, _kernel_masks(pm)):
    assert np.abs(w[m == 1]).min() >= np.abs(w[m == 0]).max()


@pytest.mark.parametrize("method", ["public_gradient", "public_saliency"])
def test_public_methods_read_only_public_data(method, spy_dataset):
  x_pub, y_pub = _data(8, seed=1)
  x_priv, y_priv = _data(8, seed=2)
  public = spy_dataset(x_pub, y_pub, batch_size=4)
  private = spy_dataset(x_priv, y_priv, batch_size=4)
  cfg = tdp.PruneConfig(method=method, sparsity=0.5, pruned="keep")
  pm = tdp.prune(_cnn(), cfg, public_data=public.dataset)
  assert public.reads == 8 and private.reads == 0
  # Same public data -> same masks; the masks do depend on the public data.
  again = tdp.prune(_cnn(), cfg, public_data=(x_pub, y_pub))
  other = tdp.prune(_cnn(), cfg, public_data=(x_priv, y_priv))
  assert all(np.array_equal(a, b) for a, b in zip(_kernel_masks(pm),
                                                  _kernel_masks(again)))
  assert not all(np.array_equal(a, b) for a, b in zip(_kernel_masks(pm),
                                                      _kernel_masks(other)))
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0), _xent())
  pm.fit(private.dataset, epochs=1, verbose=0)
  assert private.reads == 8  # training reads private data; pruning did not


def test_public_method_without_public_data_is_refused():
  with pytest.raises(ValueError, match="public_data"):
    tdp.prune(_cnn(), tdp.PruneConfig(method="public_gradient"))


# -- freeze mode through DP training ----------------------------------------


def _train(model, steps=4, momentum=0.9, seed=0):
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      1.0, 1.0, learning_rate=0.2, momentum=momentum, noise_seed=seed),
                _xent())
  x, y = _data(8 * steps, seed=seed)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def test_zero_keeps_pruned_weights_at_zero_through_dp_training():
  pm = tdp.prune(_cnn(), tdp.PruneConfig(sparsity=0.8, pruned="zero"))
  pruned = [(w.layer.kernel, w.mask("kernel").numpy() == 0)
            for w in pruning.wrappers(pm)]
  assert all(np.all(k.numpy()[off] == 0) for k, off in pruned)
  _train(pm)
  for k, off in pruned:
    assert np.all(k.numpy()[off] == 0)
    assert np.any(k.numpy()[~off] != 0)


def test_keep_keeps_frozen_weights_bit_identical_with_momentum():
  pm = tdp.prune(_cnn(), tdp.PruneConfig(method="magnitude", sparsity=0.6,
                                         pruned="keep"))
  frozen = [(w.layer.kernel, w.mask("kernel").numpy() == 0,
             w.layer.kernel.numpy().copy()) for w in pruning.wrappers(pm)]
  _train(pm)
  for k, off, before in frozen:
    assert k.numpy()[off].tobytes() == before[off].tobytes()
    assert np.any(k.numpy()[~off] != before[~off])


def test_layer_granularity_freeze_leaves_layers_out_of_per_example_work():
  pm = tdp.prune(_cnn(), tdp.PruneConfig(sparsity=0.9, scope="global",
                                         granularity="layer",
                                         weights="all"))
  frozen = [w for w in pruning.wrappers(pm)
            if all(w.statically_frozen(r) for r in w.roles())]
  assert frozen
  sampled = []
  for w in frozen:
    class Spy(type(w.sampler)):

      def per_example(self, layer, captures, specs):
        sampled.append(layer.name)
        return super().per_example(layer, captures, specs)
    object.__setattr__(w, "sampler", Spy())
  before = [v.numpy().tobytes() for w in frozen for v in w.roles().values()]
  _train(pm)
  assert not sampled
  assert [v.numpy().tobytes() for w in frozen
          for v in w.roles().values()] == before


# -- select mode --------------------------------------------------------------


def test_select_mode_moves_only_the_steps_selection():
  cfg = tdp.PruneConfig(mode="select", sparsity=0.7, every_k_steps=1, seed=3)
  pm = tdp.prune(_cnn(), cfg)
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.2,
                                           momentum=0.9), _xent())
  x, y = _data(8)
  kernels = [(w.layer.kernel, w.select_masks["kernel"])
             for w in pruning.wrappers(pm)]
  seen = []
  for _ in range(4):
    before = [k.numpy().copy() for k, _ in kernels]
    pm.train_on_batch(x, y)
    for (k, m), b in zip(kernels, before):
      off = m.numpy() == 0  # the mask drawn for this step
      assert np.array_equal(k.numpy()[off], b[off])
      assert abs(off.mean() - 0.7) < 0.05
    seen.append(np.concatenate([m.numpy().ravel() for _, m in kernels]))
  assert not np.array_equal(seen[0], seen[1])  # re-drawn every step


def test_select_every_k_steps_and_schedule():
  cfg = tdp.PruneConfig(mode="select", sparsity=0.5, every_k_steps=2,
                        sparsity_schedule=((4, 0.8),), seed=1)
  pm = tdp.prune(_mlp(), cfg)
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0), keras.losses.MeanSquaredError(
      reduction=keras.losses.Reduction.NONE))
  x = np.ones((4, 10), "float32")
  mask = pruning.wrappers(pm)[0].select_masks["kernel"]
  draws = []
  for _ in range(6):
    pm.train_on_batch(x, x)
    draws.append(mask.numpy().copy())
  assert np.array_equal(draws[0], draws[1])       # steps 0, 1: one draw
  assert not np.array_equal(draws[1], draws[2])   # step 2: new draw
  assert draws[3].mean() == 0.5 and draws[4].mean() == pytest.approx(0.2)


def test_freeze_and_select_combine_as_intersection():
  configs = [tdp.PruneConfig(sparsity=0.5, seed=1, pruned="keep"),
             tdp.PruneConfig(mode="select", sparsity=0.5, seed=2)]
  pm = tdp.prune(_mlp(), configs)
  w = pruning.wrappers(pm)[0]
  both = w.freeze_masks["kernel"].numpy() * w.select_masks["kernel"].numpy()
  np.testing.assert_array_equal(w.mask("kernel").numpy(), both)
  assert 0.1 < both.mean() < 0.4


def _public_select(method="public_gradient", sparsity=0.7, k=1, seed=3):
  return tdp.PruneConfig(mode="select", method=method, sparsity=sparsity,
                         every_k_steps=k, public_batch_size=8, seed=seed)


def _select_masks(model):
  return np.concatenate([w.select_masks["kernel"].numpy().ravel()
                         for w in pruning.wrappers(model)])


@pytest.mark.parametrize("method", ["public_gradient", "public_saliency"])
def test_select_public_moves_the_selection_scored_on_public_batch_d(method):
  x_pub, y_pub = _data(32, seed=1)
  cfg = _public_select(method)
  pm = tdp.prune(_cnn(), cfg, public_data=(x_pub, y_pub))
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.2),
             _xent())
  kernels = [w.layer.kernel for w in pruning.wrappers(pm)]
  selects = [w.select_masks["kernel"] for w in pruning.wrappers(pm)]
  # Reference: public batch d (indices from the public stream of the seed),
  # mean gradient of the plain model at the step's weights, ranked.
  batches = public.PublicBatches(x_pub, y_pub, 8, randomness.derived_key(
      3, randomness.PUBLIC_BATCHES))
  plain = tdp.strip(pm)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  x, y = _data(8)
  seen = []
  for step in range(4):
    before = [k.numpy().copy() for k in kernels]
    xb, yb = batches.batch(step)
    with tf.GradientTape() as tape:
      value = loss(yb, plain(xb))
    expected = masks.compute_masks(cfg, kernels,
                                   public_grads=tape.gradient(value, kernels))
    pm.train_on_batch(x, y)
    for k, m, b, e in zip(kernels, selects, before, expected):
      selected = m.numpy() == 1
      assert (selected != (e.numpy() == 1)).sum() <= 2  # float ties
      moved = k.numpy() != b
      np.testing.assert_array_equal(moved, selected)  # noise moves them all
      assert abs(moved.mean() - 0.3) <= 1 / moved.size  # 1 - sparsity
    seen.append(_select_masks(pm))
  assert not np.array_equal(seen[0], seen[1])  # re-drawn on new batches


def test_select_public_identical_across_private_data():
  x_pub, y_pub = _data(32, seed=1)
  runs = []
  for private_seed in (5, 6):
    pm = tdp.prune(_cnn(), _public_select(), public_data=(x_pub, y_pub))
    # learning_rate 0: the weights stay fixed, so only the data could differ.
    pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.0),
               _xent())
    x, y = _data(8, seed=private_seed)
    drawn = []
    for _ in range(3):
      pm.train_on_batch(x, y)
      drawn.append(_select_masks(pm))
    runs.append(drawn)
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[0][0], runs[0][1])


def test_loaded_select_public_model_needs_its_public_data_back(tmp_path):
  x_pub, y_pub = _data(32, seed=1)
  pm = tdp.prune(_cnn(), _public_select("public_saliency"),
                 public_data=(x_pub, y_pub))
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.2,
                                           noise_seed=4), _xent())
  x, y = _data(8)
  for _ in range(2):
    pm.train_on_batch(x, y)
  pm.save(str(tmp_path / "m.keras"))
  loaded = keras.models.load_model(str(tmp_path / "m.keras"))
  with pytest.raises(ValueError, match="attach_public_data"):
    loaded.train_on_batch(x, y)
  tdp.attach_public_data(loaded, (x_pub, y_pub))
  loaded.train_on_batch(x, y)
  pm.train_on_batch(x, y)
  np.testing.assert_array_equal(_select_masks(loaded), _select_masks(pm))
  with pytest.raises(ValueError, match="no layer"):
    tdp.attach_public_data(tdp.prune(_cnn(), tdp.PruneConfig()),
                           (x_pub, y_pub))


# -- strip, save/load, resume ----------------------------------------------


def test_strip_gives_identical_predictions_and_plain_layers(tmp_path):
  pm = tdp.prune(_cnn(), tdp.PruneConfig(sparsity=0.5))
  _train(pm)
  plain = tdp.strip(pm)
  assert not any(isinstance(l, tdp.PruneWrapper) for l in plain.layers)
  x, _ = _data(8, seed=9)
  np.testing.assert_array_equal(plain.predict(x, verbose=0),
                                pm.predict(x, verbose=0))
  plain.save(str(tmp_path / "plain.keras"))


def test_masks_survive_save_and_load(tmp_path):
  cfg = [tdp.PruneConfig(sparsity=0.5, granularity="neuron"),
         tdp.PruneConfig(mode="select", sparsity=0.3, every_k_steps=2)]
  pm = tdp.prune(_cnn(), cfg)
  _train(pm, steps=3)
  pm.save(str(tmp_path / "m.keras"))
  loaded = keras.models.load_model(str(tmp_path / "m.keras"))
  for a, b in zip(pruning.wrappers(pm), pruning.wrappers(loaded)):
    assert a.select_config == b.select_config
    assert a.mask_structure == b.mask_structure
    np.testing.assert_array_equal(a.mask("kernel"), b.mask("kernel"))
  assert masks.density(loaded) == masks.density(pm)
  # The loaded model keeps re-drawing its selection while it trains on.
  before = pruning.wrappers(loaded)[0].select_masks["kernel"].numpy().copy()
  x, y = _data(8)
  for _ in range(2):
    loaded.train_on_batch(x, y)
  after = pruning.wrappers(loaded)[0].select_masks["kernel"].numpy()
  assert not np.array_equal(before, after)


def _select_run(tmp_path, total, interrupt_at=None, method="random"):
  """Train `total` steps (optionally stopping and restoring); return masks."""
  cfg = tdp.PruneConfig(mode="select", method=method, sparsity=0.6,
                        every_k_steps=2, seed=5)
  x, y = _data(8)
  drawn = []
  public_data = _data(24, seed=7) if method != "random" else None

  def build():
    pm = tdp.prune(_cnn(seed=0), cfg, public_data=public_data)
    opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.2,
                                        momentum=0.9, noise_seed=11)
    pm.compile(opt, _xent())
    return pm, tf.train.Checkpoint(model=pm, optimizer=opt)

  pm, ckpt = build()
  for step in range(total):
    if step == interrupt_at:
      path = ckpt.save(str(tmp_path / "ckpt"))
      pm, ckpt = build()
      ckpt.restore(path)
    pm.train_on_batch(x, y)
    drawn.append(np.concatenate([w.select_masks["kernel"].numpy().ravel()
                                 for w in pruning.wrappers(pm)]))
  return drawn, int(pm.optimizer.iterations.numpy()), pm.get_weights()


@pytest.mark.parametrize("method", ["random", "public_gradient"])
def test_resumed_run_draws_the_same_selections(tmp_path, method):
  full, steps_a, weights_a = _select_run(tmp_path / "a", 6, method=method)
  resumed, steps_b, weights_b = _select_run(tmp_path / "b", 6, interrupt_at=3,
                                            method=method)
  assert steps_a == steps_b == 6
  for a, b in zip(full, resumed):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(weights_a, weights_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_density_reports_overall_fraction_updated():
  pm = tdp.prune(_mlp(), tdp.PruneConfig(sparsity=0.3, pruned="keep"))
  d = masks.density(pm)
  # 2 kernels of 100 at 0.7 + 2 biases of 10 at 1.0 -> 160 / 220.
  assert d["overall"] == pytest.approx(160 / 220)
  assert all(d[w.layer.name] == pytest.approx(80 / 110)
             for w in pruning.wrappers(pm))


@pytest.mark.parametrize("layer,why", [
    (lambda: keras.layers.BatchNormalization(), "mixes the examples"),
    (lambda: keras.layers.Dense(3, kernel_regularizer="l2"), "weight penalt"),
    (lambda: keras.layers.Dense(3, activity_regularizer="l2"), "per-example"),
])
def test_prune_refuses_layers_that_break_per_example_dp(layer, why):
  model = keras.Sequential([keras.Input((4,)), layer(), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match=why):
    tdp.prune(model)


def test_prune_with_config_needs_a_built_model():
  unbuilt = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match="built model"):
    tdp.prune(unbuilt, tdp.PruneConfig())
