"""Data sets, the public/private split and Poisson sampling."""

import dataclasses
import gzip
import os
import struct
import sys
import types

import numpy as np
import pytest

from tfdpprune import data
from tfdpprune._compat import tf

# The real MNIST test split (t10k files only); CI may point elsewhere.
MNIST_DIR = os.environ.get("TFDPPRUNE_MNIST_DIR", "/work/shared/data/mnist")
FASHION_DIR = os.path.join(data.SYSTEM_DATASETS_DIR, "fashion-mnist")

needs_mnist = pytest.mark.skipif(
    not os.path.isdir(MNIST_DIR), reason=f"no MNIST IDX files in {MNIST_DIR}")
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason="apt-get install dataset-fashion-mnist")


def _write_idx(path, array, compress=True):
  codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C}
  header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if compress else raw)


def _write_idx_dir(directory, splits=("train", "test"), n=6, size=4):
  rng = np.random.default_rng(0)
  arrays = {}
  for split in splits:
    prefix = "train" if split == "train" else "t10k"
    x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    y = (np.arange(n) % 3).astype(np.uint8)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), x)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), y)
    arrays[split] = (x, y)
  return arrays


def _fake_dataset(n=20, shape=(2, 2, 1), num_classes=3):
  # x[i] is filled with i, so an example is identified by its pixels.
  x = np.broadcast_to(np.arange(n, dtype=np.float32).reshape(-1, 1, 1, 1),
                      (n,) + shape).copy()
  y = (np.arange(n) % num_classes).astype(np.int32)
  return data.Dataset("fake", x, y, x[:4].copy(), y[:4].copy(), num_classes)


# ----------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------


@needs_mnist
def test_real_mnist_test_split_shapes_labels_and_scaling():
  x, y = data.load_idx_split(MNIST_DIR, "test")
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (10000,) and y.dtype == np.int32
  counts = np.bincount(y, minlength=10)
  assert len(counts) == 10 and counts.sum() == 10000
  assert counts.min() >= 850 and counts.max() <= 1200  # 892 .. 1135
  assert x.min() == 0.0 and x.max() == 1.0


@needs_mnist
def test_real_mnist_with_mnist_constants_is_standardized():
  mean, std = data.NORMALIZATION["mnist"]
  x, _ = data.load_idx_split(MNIST_DIR, "test", mean=mean, std=std)
  # Test-split statistics (0.1325, 0.3105) are close to the train constants.
  assert abs(float(x.mean())) < 0.02
  assert abs(float(x.std()) - 1.0) < 0.02


@needs_mnist
def test_test_only_directory_names_missing_train_files():
  for call in (lambda: data.load_dataset(MNIST_DIR),
               lambda: data.load_dataset("mnist", data_dir=MNIST_DIR)):
    with pytest.raises(FileNotFoundError) as info:
      call()
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "train-labels-idx1-ubyte.gz" in message
    assert "t10k-images" not in message  # the test split is present
    assert "load_idx_split" in message


def test_missing_split_names_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
    data.load_idx_split(str(tmp_path), "test")


@pytest.mark.parametrize("compress", [True, False])
def test_corrupted_magic_number_is_refused(tmp_path, compress):
  path = str(tmp_path / "t10k-images-idx3-ubyte")
  raw = struct.pack(">I3I", 0x12340803, 1, 2, 2) + bytes(4)
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if compress else raw)
  with pytest.raises(ValueError, match="magic number 0x12340803"):
    data.read_idx(path)


def test_labels_file_with_image_magic_is_refused(tmp_path):
  path = str(tmp_path / "labels.gz")
  _write_idx(path, np.zeros((2, 2, 2), np.uint8))  # magic 0x00000803
  with pytest.raises(ValueError, match="expected 1"):
    data.read_idx(path, ndim=1)


def test_truncated_idx_is_refused(tmp_path):
  path = str(tmp_path / "x")
  with open(path, "wb") as f:
    f.write(struct.pack(">I3I", 0x803, 2, 2, 2) + bytes(7))  # 8 bytes needed
  with pytest.raises(ValueError, match="holds 7"):
    data.read_idx(path)


def test_read_idx_round_trip_big_endian_int32(tmp_path):
  path = str(tmp_path / "ints")
  values = np.array([[1, -2], [70000, 3]], np.int32)
  _write_idx(path, values, compress=False)
  np.testing.assert_array_equal(data.read_idx(path), values)


def test_idx_directory_by_path_is_scaled_to_unit_interval(tmp_path):
  arrays = _write_idx_dir(str(tmp_path))
  ds = data.load_dataset(str(tmp_path))
  x_train, y_train = arrays["train"]
  np.testing.assert_allclose(ds.x_train[..., 0], x_train / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, y_train)
  assert ds.num_classes == 3 and ds.input_shape == (4, 4, 1)
  assert ds.name == str(tmp_path)


def _refuse_tfds(monkeypatch):
  def load(*args, **kwargs):
    raise AssertionError(f"tfds must not be used: {args} {kwargs}")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      types.SimpleNamespace(load=load, as_numpy=load))


def test_mnist_name_resolves_data_dir_before_system_dir(tmp_path, monkeypatch):
  _refuse_tfds(monkeypatch)
  user, system = tmp_path / "user", tmp_path / "system" / "mnist"
  user.mkdir()
  system.mkdir(parents=True)
  user_arrays = _write_idx_dir(str(user), n=6)
  _write_idx_dir(str(system), n=9)
  monkeypatch.setattr(data, "SYSTEM_DATASETS_DIR", str(tmp_path / "system"))

  ds = data.load_dataset("mnist", data_dir=str(user))
  assert ds.num_train == 6 and ds.name == "mnist" and ds.num_classes == 10
  (mean,), (std,) = data.NORMALIZATION["mnist"]
  expected = (user_arrays["test"][0] / 255.0 - mean) / std
  np.testing.assert_allclose(ds.x_test[..., 0], expected, rtol=1e-5)

  assert data.load_dataset("mnist").num_train == 9  # the system directory


def test_mnist_name_falls_back_to_tfds_without_idx_dirs(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "SYSTEM_DATASETS_DIR", str(tmp_path))
  calls = []
  rng = np.random.default_rng(0)
  splits = [(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, n)) for n in (5, 3)]

  def load(name, **kwargs):
    calls.append((name, kwargs))
    return splits
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      types.SimpleNamespace(load=load, as_numpy=lambda s: s))

  ds = data.load_dataset("fashion_mnist")
  assert calls == [("fashion_mnist", dict(
      split=["train", "test"], batch_size=-1, as_supervised=True,
      data_dir=None))]
  assert (ds.num_train, ds.num_test, ds.num_classes) == (5, 3, 10)
  assert ds.y_train.dtype == np.int32


def test_colour_sets_use_tfds_with_data_dir_and_channel_constants(monkeypatch):
  calls = []
  x = np.full((2, 32, 32, 3), 255, np.uint8)  # white: (1 - mean) / std

  def load(name, **kwargs):
    calls.append((name, kwargs["data_dir"]))
    return [(x, np.array([0, 99])), (x[:1], np.array([5]))]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      types.SimpleNamespace(load=load, as_numpy=lambda s: s))

  ds = data.load_dataset("cifar100", data_dir="/somewhere")
  assert calls == [("cifar100", "/somewhere")]
  mean, std = data.NORMALIZATION["cifar100"]
  expected = (1.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(ds.x_train[0, 0, 0], expected, rtol=1e-5)
  assert ds.num_classes == 100


@needs_fashion
def test_fashion_mnist_from_debian_package():
  ds = data.load_dataset("fashion_mnist")
  assert ds.x_train.shape == (60000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
  # Normalized with the published train constants (0.2860, 0.3530).
  assert abs(float(ds.x_train.mean())) < 0.01
  assert abs(float(ds.x_train.std()) - 1.0) < 0.01


# ----------------------------------------------------------------------------
# npz, digits, names, the Dataset container
# ----------------------------------------------------------------------------


def test_npz_round_trip_uint8_and_float(tmp_path):
  rng = np.random.default_rng(1)
  x_train = rng.integers(0, 256, (7, 5, 5), dtype=np.uint8)  # [N, H, W]
  x_test = rng.normal(size=(3, 5, 5, 1)).astype(np.float64)
  path = str(tmp_path / "toy.npz")
  np.savez(path, x_train=x_train, y_train=np.arange(7).reshape(7, 1) % 4,
           x_test=x_test, y_test=np.array([0, 1, 3]))  # public: 4 classes

  ds = data.load_dataset(path)
  assert ds.x_train.shape == (7, 5, 5, 1) and ds.x_train.dtype == np.float32
  np.testing.assert_allclose(ds.x_train[..., 0], x_train / 255.0, rtol=1e-6)
  np.testing.assert_allclose(ds.x_test, x_test, rtol=1e-6)  # float: as is
  np.testing.assert_array_equal(ds.y_train, np.arange(7) % 4)
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 4


def test_npz_missing_arrays_are_named(tmp_path):
  path = str(tmp_path / "bad.npz")
  np.savez(path, x_train=np.zeros((1, 2, 2)), y_train=np.zeros(1))
  with pytest.raises(ValueError, match="x_test"):
    data.load_dataset(path)


def test_digits_shapes_split_and_scaling():
  ds = data.load_dataset("digits")
  assert ds.num_train + ds.num_test == 1797
  assert (ds.num_train, ds.num_test) == (1437, 360)
  assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0  # x / 16
  counts = np.bincount(ds.y_test, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified
  again = data.load_dataset("digits")
  np.testing.assert_array_equal(ds.x_test, again.x_test)


def test_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError) as info:
    data.load_dataset("imagenet_tiny")
  for name in ("digits", "mnist", "fashion_mnist", "emnist", "cifar10",
               "cifar100", "svhn_cropped", ".npz"):
    assert name in str(info.value)


def test_dataset_is_frozen_and_validated():
  ds = _fake_dataset()
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.num_classes = 5
  with pytest.raises(ValueError, match="float32"):
    dataclasses.replace(ds, x_train=ds.x_train.astype(np.float64))
  with pytest.raises(ValueError, match="num_classes=2"):
    dataclasses.replace(ds, num_classes=2)


# ----------------------------------------------------------------------------
# Public / private split
# ----------------------------------------------------------------------------


def test_public_split_is_disjoint_exact_and_deterministic():
  ds = _fake_dataset(n=20)
  private, (x_pub, y_pub) = data.split_public(ds, 0.25, seed=3)
  assert len(x_pub) == len(y_pub) == 5  # floor(0.25 * 20)
  assert private.num_train == 15
  pub_ids = set(x_pub[:, 0, 0, 0].astype(int))
  priv_ids = set(private.x_train[:, 0, 0, 0].astype(int))
  assert not pub_ids & priv_ids and pub_ids | priv_ids == set(range(20))
  np.testing.assert_array_equal(y_pub, np.array(sorted(pub_ids)) % 3)
  np.testing.assert_array_equal(private.x_test, ds.x_test)

  again, (x_again, _) = data.split_public(ds, 0.25, seed=3)
  np.testing.assert_array_equal(x_again, x_pub)
  np.testing.assert_array_equal(again.x_train, private.x_train)
  _, (x_other, _) = data.split_public(ds, 0.25, seed=4)
  assert not np.array_equal(x_other, x_pub)


def test_public_split_floor_and_zero_fraction():
  ds = _fake_dataset(n=19)
  private, (x_pub, _) = data.split_public(ds, 0.1, seed=0)
  assert (private.num_train, len(x_pub)) == (18, 1)  # floor(1.9) = 1
  _, (x_pub, _) = data.split_public(_fake_dataset(n=100), 0.29, seed=0)
  assert len(x_pub) == 29  # although 0.29 * 100 = 28.999999999999996
  private, (x_pub, y_pub) = data.split_public(ds, 0.0, seed=0)
  assert private.num_train == 19
  assert x_pub.shape == (0, 2, 2, 1) and y_pub.shape == (0,)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_public_fraction_out_of_range_is_refused(fraction):
  with pytest.raises(ValueError, match=r"public_fraction must be in \[0, 1\)"):
    data.split_public(_fake_dataset(), fraction, seed=0)


# ----------------------------------------------------------------------------
# Poisson batches
# ----------------------------------------------------------------------------


def _ids(n):
  return np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int32)


def _batch_ids(dataset):
  return [yb.numpy().tolist() for _, yb in dataset]


def test_poisson_batch_size_matches_qn_two_sided():
  n, q, steps = 1000, 0.05, 400
  sizes = np.array([len(b) for b in _batch_ids(
      data.poisson_batches(*_ids(n), q, steps, seed=7))])
  total = sizes.sum()

  def consistent(rate):  # total ~ Binomial(n * steps, rate): 4-sigma band
    sd = np.sqrt(n * steps * rate * (1 - rate))
    return abs(total - n * steps * rate) < 4 * sd

  assert consistent(q)  # E = 20000, sd = 138
  assert not consistent(0.9 * q) and not consistent(1.1 * q)  # off by 2000
  # Poisson sizes vary like Binomial(n, q): Var = 47.5 (not 0 as fixed-size).
  assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.4


def test_poisson_batches_sample_without_replacement():
  for batch in _batch_ids(data.poisson_batches(*_ids(200), 0.3, 20, seed=1)):
    assert batch == sorted(set(batch))


def test_poisson_batches_reproducible_and_resumable():
  x, y = _ids(300)
  full = _batch_ids(data.poisson_batches(x, y, 0.1, 12, seed=5))
  assert full == _batch_ids(data.poisson_batches(x, y, 0.1, 12, seed=5))
  resumed = data.poisson_batches(x, y, 0.1, 12, seed=5, start_step=8)
  assert _batch_ids(resumed) == full[8:]
  longer = _batch_ids(data.poisson_batches(x, y, 0.1, 20, seed=5))
  assert longer[:12] == full  # a batch depends on (seed, step) only
  assert _batch_ids(data.poisson_batches(x, y, 0.1, 12, seed=6)) != full


def test_poisson_batches_empty_and_full():
  x = np.zeros((50, 3, 3, 1), np.float32)
  y = np.zeros(50, np.int32)
  for xb, yb in data.poisson_batches(x, y, 0.0, 3, seed=0):
    assert xb.shape == (0, 3, 3, 1) and yb.shape == (0,)
    assert xb.dtype == np.float32
  for xb, _ in data.poisson_batches(x, y, 1.0, 2, seed=0):
    assert xb.shape[0] == 50


def test_poisson_max_batch_size_truncates_to_subset():
  x, y = _ids(100)
  plain = _batch_ids(data.poisson_batches(x, y, 0.5, 5, seed=2))
  capped = _batch_ids(data.poisson_batches(x, y, 0.5, 5, seed=2,
                                           max_batch_size=10))
  for full, cut in zip(plain, capped):
    assert len(cut) == min(10, len(full)) and set(cut) <= set(full)


def test_truncation_probability_hand_computed():
  # Binomial(10, 1/2) > 9 only if all 10 are drawn: 2^-10.
  assert data.poisson_truncation_probability(10, 0.5, 9) == pytest.approx(
      1 / 1024)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampling_probability=1.5), "sampling_probability"),
    (dict(start_step=11), "start_step"),
    (dict(max_batch_size=0), "max_batch_size"),
])
def test_poisson_invalid_arguments(kwargs, message):
  args = dict(sampling_probability=0.1, num_steps=10, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    data.poisson_batches(*_ids(10), **args)


def test_shuffled_batches_cover_each_example_once():
  x, y = _ids(10)
  batches = _batch_ids(data.shuffled_batches(x, y, 4, seed=0))
  assert [len(b) for b in batches] == [4, 4, 2]
  assert sorted(sum(batches, [])) == list(range(10))
  assert batches == _batch_ids(data.shuffled_batches(x, y, 4, seed=0))
  assert _batch_ids(data.shuffled_batches(x, y, 4, seed=None)) == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ----------------------------------------------------------------------------
# Checked inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_with_count_and_first_index(split,
                                                                    bad):
  ds = _fake_dataset(n=20)
  x = getattr(ds, f"x_{split}").copy()
  x[2, 0, 1, 0] = bad
  x[3, 1, 1, 0] = bad
  x[3, 0, 0, 0] = bad
  with pytest.raises(ValueError) as e:
    dataclasses.replace(ds, **{f"x_{split}": x})
  message = str(e.value)
  assert f"x_{split} has 3 non-finite values" in message
  assert "in 2 examples" in message and "first is example 2" in message


def test_npz_with_nan_pixels_or_labels_is_refused(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.random((10, 4, 4, 1)).astype(np.float32)
  y = (np.arange(10) % 3).astype(np.float64)
  path = str(tmp_path / "bad.npz")
  x[5, 0, 0, 0] = np.nan
  np.savez(path, x_train=x, y_train=y, x_test=x[:2] * 0, y_test=y[:2])
  with pytest.raises(ValueError, match="x_train has 1 non-finite values"):
    data.load_dataset(path)
  x[5, 0, 0, 0] = 0.0
  y[7] = np.inf
  np.savez(path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
  with pytest.raises(ValueError, match="y_train has 1 non-finite values .* "
                     "first is example 7"):
    data.load_dataset(path)
  y[7] = 1.5
  np.savez(path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
  with pytest.raises(ValueError, match="non-integer labels"):
    data.load_dataset(path)


def test_overlapping_examples_finds_shared_content():
  x = np.random.default_rng(2).random((20, 3, 3, 1)).astype(np.float32)
  public = x[[15, 3]].copy()
  public = np.concatenate([public, public[:1] ** 2])  # other content
  np.testing.assert_array_equal(data.overlapping_examples(public, x), [0, 1])
  assert data.overlapping_examples(x[:0], x).size == 0


def test_poisson_batches_are_secret_by_default():
  x, y = _ids(500)
  a = _batch_ids(data.poisson_batches(x, y, 0.1, 5))
  b = _batch_ids(data.poisson_batches(x, y, 0.1, 5))
  assert a != b  # fresh secret keys


def test_integer_seed_selection_reproduces_the_seeded_batches():
  x, y = _ids(300)
  batches = _batch_ids(data.poisson_batches(x, y, 0.1, 4, seed=9))
  for step, ids in enumerate(batches):
    assert data.poisson_selection(300, 0.1, 9, step).numpy().tolist() == ids


def test_overlap_is_found_whatever_the_normalization():
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, size=(30, 5, 5, 1)).astype(np.float32)
  private = (pixels / 255.0 - 0.2860) / 0.3530     # named-set normalization
  public = np.concatenate([pixels[[4, 9]] / 255.0,  # path-loaded: x / 255
                           rng.random((3, 5, 5, 1)).astype(np.float32)])
  np.testing.assert_array_equal(data.overlapping_examples(public, private),
                                [0, 1])


def test_tensorflow_datasets_builder_modules_import():
  # A missing pinned dependency of tensorflow-datasets' builders
  # (importlib_resources) used to surface only when a data set was loaded.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for name in ("mnist", "fashion_mnist", "cifar10"):
    assert tfds.builder_cls(name).code_path


def test_tfds_download_failure_is_a_clear_error(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'storage.googleapis.com'")
  monkeypatch.setattr(tfds, "load", offline)
  monkeypatch.setattr(data, "SYSTEM_DATASETS_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="could not prepare 'mnist'.*"
                     "TFDS_DATA_DIR"):
    data.load_dataset("mnist")


def test_augment_images_gives_crops_and_flips_of_each_image():
  rng = np.random.default_rng(8)
  x = rng.random((6, 5, 5, 2)).astype(np.float32)
  out = data.augment_images(tf.constant(x), tf.constant([3, 4], tf.int64),
                            pad=1).numpy()
  padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
  for i in range(6):
    options = []
    for flip in (False, True):
      img = padded[i, :, ::-1] if flip else padded[i]
      options += [img[a:a + 5, b:b + 5] for a in range(3) for b in range(3)]
    assert any(np.allclose(out[i], o) for o in options)


def test_poisson_batches_with_augmult_repeat_each_example():
  x = np.tile(np.arange(40, dtype=np.float32)[:, None, None, None],
              (1, 7, 7, 1))  # image i is constant i: crops/flips keep it
  y = np.arange(40, dtype=np.int32)
  batches = list(data.poisson_batches(x, y, 0.3, 4, augmult=3))
  for xb, yb in batches:
    yb = yb.numpy()
    assert len(yb) % 3 == 0
    groups = yb.reshape(-1, 3)
    assert np.all(groups == groups[:, :1])  # 3 consecutive rows per example
    np.testing.assert_array_equal(xb.numpy()[:, 0, 0, 0], yb)
  with pytest.raises(ValueError, match="augmult"):
    data.poisson_batches(x[:, 0, 0], y, 0.3, 4, augmult=2)


# ----------------------------------------------------------------------------
# The number of classes is public; bad inputs name themselves
# ----------------------------------------------------------------------------


def _npz(path, y_train, y_test, **extra):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.random((len(y_train), 3, 3)),
           y_train=np.asarray(y_train), x_test=rng.random((len(y_test), 3, 3)),
           y_test=np.asarray(y_test), **extra)
  return path


@pytest.mark.parametrize("kind", ["npz", "idx"])
def test_one_extra_private_label_never_changes_the_model_shape(tmp_path,
                                                               kind):
  # D (labels 0..9) and D + one example labelled 10: the attack of a model
  # with an 11th logit. The class count comes from the public test labels,
  # so D + 1 is refused at load, and D gives 10 classes.
  y = np.arange(40) % 10
  y_test = np.arange(20) % 10
  loaded = []
  for name, labels in (("d", y), ("d_plus_one", np.append(y, 10))):
    if kind == "npz":
      path = _npz(str(tmp_path / f"{name}.npz"), labels, y_test)
    else:
      path = str(tmp_path / name)
      os.makedirs(path)
      rng = np.random.default_rng(0)
      for prefix, ys in (("train", labels), ("t10k", y_test)):
        _write_idx(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"),
                   rng.integers(0, 256, (len(ys), 3, 3), dtype=np.uint8))
        _write_idx(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"),
                   ys.astype(np.uint8))
    try:
      loaded.append(data.load_dataset(path).num_classes)
    except ValueError as e:
      assert "label 10" in str(e) and "num_classes=10" in str(e)
      assert "public information only" in str(e)
      loaded.append("refused")
  assert loaded == [10, "refused"]
  # The public ways to say there are 11 classes.
  if kind == "npz":
    assert data.load_dataset(_npz(str(tmp_path / "meta.npz"), np.append(
        y, 10), y_test, num_classes=11)).num_classes == 11
  assert data.load_dataset(path, num_classes=11).num_classes == 11


def test_empty_test_set_cannot_give_the_number_of_classes(tmp_path):
  path = _npz(str(tmp_path / "d.npz"), [0, 1, 2], np.zeros([0], np.int64))
  with pytest.raises(ValueError, match="empty test set"):
    data.load_dataset(path)
  assert data.load_dataset(path, num_classes=3).num_test == 0


def test_huge_float_label_is_reported_as_itself(tmp_path):
  path = _npz(str(tmp_path / "d.npz"), np.array([0.0, 3e9, 1.0]),
              np.array([0, 1]))
  with pytest.raises(ValueError) as e:
    data.load_dataset(path)
  assert "3000000000" in str(e.value) and "example 1" in str(e.value)
  assert "-2147483648" not in str(e.value)


def test_truncated_gzip_names_the_file(tmp_path):
  arrays = _write_idx_dir(str(tmp_path))
  del arrays
  path = str(tmp_path / "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: damaged "
                     "gzip"):
    data.load_dataset(str(tmp_path))
