"""Scattering features: against a plain-numpy reference, shapes, the cache,
and the trainer's --features flag."""

import hashlib
import os

import numpy as np
import pytest

from tfdpprune import experiment
from tfdpprune import models
from tfdpprune import scattering
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.config import TrainConfig


def _numpy_reference(x, phi, psi, J):
  """Full-resolution scattering in numpy, subsampled only at the end."""
  step = 2 ** J
  pad = np.pad(x, [(0, 0), (step, step), (step, step)], mode="reflect")

  def lowpass(u):
    out = np.real(np.fft.ifft2(np.fft.fft2(u) * phi))
    return out[..., ::step, ::step][..., 1:-1, 1:-1]

  s0 = lowpass(pad)[:, None]
  u1 = np.abs(np.fft.ifft2(np.fft.fft2(pad)[:, None, None] * psi))
  s1 = lowpass(u1).reshape(len(x), -1, *s0.shape[-2:])
  s2 = []
  for j1 in range(J):
    for t1 in range(psi.shape[1]):
      for j2 in range(j1 + 1, J):
        u2 = np.abs(np.fft.ifft2(np.fft.fft2(u1[:, j1, t1])[:, None] *
                                 psi[j2][None]))
        s2.append(lowpass(u2))
  s2 = np.concatenate(s2, axis=1)
  return np.concatenate([s0, s1, s2], axis=1).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("J,L", [(2, 8), (3, 4)])
def test_matches_a_full_resolution_numpy_reference(J, L):
  x = np.random.RandomState(0).randn(3, 32, 32, 1).astype(np.float32)
  layer = scattering.Scattering2D(J=J, L=L)
  got = layer(x).numpy()
  expected = _numpy_reference(x[..., 0], layer._phi.numpy(),
                              layer._psi.numpy(), J)
  assert got.shape == (3, 32 // 2 ** J, 32 // 2 ** J,
                       scattering.num_channels(J, L))
  np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())


def test_wavelets_have_zero_mean_and_the_lowpass_keeps_the_mean():
  phi, psi = scattering.filter_bank(36, 2, 8)
  assert phi[0, 0] == pytest.approx(1.0, abs=1e-5)      # sums to 1
  np.testing.assert_allclose(psi[..., 0, 0], 0.0, atol=1e-6)
  # Order 0 of a constant image is the constant; orders 1, 2 vanish.
  out = scattering.Scattering2D()(tf.fill([1, 28, 28, 1], 3.0)).numpy()
  np.testing.assert_allclose(out[..., 0], 3.0, rtol=1e-5)
  np.testing.assert_allclose(out[..., 1:], 0.0, atol=1e-4)


def test_channels_of_each_input_channel_are_adjacent():
  x = np.random.RandomState(1).randn(2, 28, 28, 2).astype(np.float32)
  both = scattering.transform(x)
  assert both.shape == (2, 7, 7, 162)
  np.testing.assert_allclose(both[..., 81:], scattering.transform(x[..., 1:]),
                             rtol=1e-5, atol=1e-6)


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="multiple of 4"):
    scattering.Scattering2D()(tf.zeros([1, 30, 30, 1]))
  with pytest.raises(ValueError, match="J=7"):
    scattering.Scattering2D(J=7)


def test_layer_round_trips_through_keras_config():
  layer = scattering.Scattering2D(J=3, L=4)
  again = keras.layers.deserialize(keras.layers.serialize(layer))
  assert (again.J, again.L) == (3, 4) and not again.trainable_weights


def test_cache_returns_the_same_features_and_keys_on_the_images(tmp_path):
  x = np.random.RandomState(2).randn(5, 28, 28, 1).astype(np.float32)
  first = scattering.transform(x, cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 1
  np.testing.assert_array_equal(
      scattering.transform(x, cache_dir=str(tmp_path)), first)
  other = scattering.transform(x + 1, cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 2 and not np.allclose(other, first)


def test_linear_model_with_group_norm_has_one_dense_layer():
  model = models.get_model("linear", (7, 7, 81), 10, norm="group")
  assert [w.shape.as_list() for w in model.trainable_weights] == [
      [3969, 10], [10]]
  assert model.get_layer("input_norm").groups == 27
  models.check_dp_compatible(model)


def test_trainer_trains_a_linear_model_on_features(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv(experiment.FEATURE_CACHE_ENV, str(cache))
  workdir = str(tmp_path / "run")
  # digits: 8x8 images -> 2x2x81 features.
  config = TrainConfig(steps=4, features="scattering", model="linear",
                       model_norm="group", noise_multiplier=1.0,
                       batch_size=64, learning_rate=1.0)
  results = experiment.run(config, workdir, verbose=0)
  assert results["config"]["features"] == "scattering"
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert len(os.listdir(cache)) == 2              # train and test features
  released = [f for _, _, files in os.walk(workdir) for f in files]
  assert not [f for f in released if f.startswith("scattering")]


def test_features_refuse_augmult_and_unknown_names():
  with pytest.raises(ValueError, match="--augmult"):
    TrainConfig(features="scattering", augmult=2)
  with pytest.raises(ValueError, match="--features"):
    TrainConfig(features="sift")


def test_layer_in_front_of_a_feature_model_serves_raw_images():
  x = np.random.RandomState(3).randn(4, 28, 28, 1).astype(np.float32)
  head = models.get_model("linear", (7, 7, 81), 10, norm="group")
  served = keras.Sequential([keras.Input((28, 28, 1)),
                             scattering.Scattering2D(), head])
  np.testing.assert_allclose(served(x).numpy(),
                             head(scattering.transform(x)).numpy(),
                             rtol=1e-4, atol=1e-5)


def test_cache_names_are_keyed_with_the_fingerprint_key(tmp_path,
                                                        monkeypatch):
  from tfdpprune import ledger  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(2).randn(3, 8, 8, 1).astype(np.float32)
  names = []
  for key in ("a", "b", "a"):
    monkeypatch.setenv(ledger.KEY_FILE_ENV, str(tmp_path / f"{key}.key"))
    cache = tmp_path / f"cache-{len(names)}"
    scattering.transform(x, cache_dir=str(cache))
    names.append(os.listdir(cache)[0])
  assert names[0] != names[1] and names[0] == names[2]
  # Not an unsalted hash of the images (a membership oracle).
  plain = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
  assert plain[:32] not in names[0]


def test_trainer_refuses_a_cache_inside_a_run_directory(tmp_path,
                                                        monkeypatch):
  workdir = tmp_path / "run"
  config = TrainConfig(steps=2, features="scattering", model="linear",
                       noise_multiplier=1.0)
  other = tmp_path / "other_run"
  (other / "checkpoints").mkdir(parents=True)
  for cache in (workdir / "cache", other / "features"):
    monkeypatch.setenv(experiment.FEATURE_CACHE_ENV, str(cache))
    with pytest.raises(ValueError, match="inside the run directory") as e:
      experiment.run(config, str(workdir), verbose=0)
    assert "--features" in str(e.value)
    assert not cache.exists()
