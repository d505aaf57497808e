"""Datasets (embedded, IDX, npz, tfds), the public/private split, sampling.

Every loader returns a `Dataset` of numpy arrays: images float32 NHWC,
labels int32. Normalization uses *public* constants only (never statistics
of the private training data):

* MNIST-like names (`mnist`, `fashion_mnist`, `emnist`) and the colour sets
  (`cifar10`, `cifar100`, `svhn_cropped`): `(x / 255 - mean) / std` with the
  per-channel constants in `NORMALIZATION`.
* `digits` (scikit-learn's 8x8 digits, pixel values 0..16): `x / 16` in
  [0, 1].
* An IDX directory or `.npz` file given by path: uint8 pixels scaled to
  [0, 1] (`x / 255`); float pixels are taken as already normalized.

Non-finite features or labels are refused at load (`check_finite`).

DP-SGD's accounting assumes Poisson subsampling, so training batches come
from `poisson_batches` (`tfdpprune.core.sampling`, re-exported here: each
example joins each step's batch independently with probability q, from a
secret key), not from fixed-size shuffled batches; `shuffled_batches` is
for evaluation and non-private training.

```python
from tfdpprune import data
ds = data.load_dataset("digits")
private, (x_pub, y_pub) = data.split_public(ds, public_fraction=0.1, seed=0)
batches = data.poisson_batches(private.x_train, private.y_train,
                               sampling_probability=0.05, num_steps=100)
```
"""

import dataclasses
import gzip
import hashlib
import math
import os
import struct
import zlib
from typing import Optional, Tuple

import numpy as np

# Re-exported: `poisson_batches` and its truncation (the public names they
# always had here).
# pylint: disable=unused-import
from tfdpprune.core.accounting import poisson_truncation_probability
from tfdpprune.core.sampling import augment_images
from tfdpprune.core.sampling import default_augmentation_pad
from tfdpprune.core.sampling import distributed_poisson_batches
from tfdpprune.core.sampling import poisson_batches
from tfdpprune.core.sampling import poisson_selection
from tfdpprune.core.sampling import poisson_spec
from tfdpprune.core.sampling import PoissonSpec
from tfdpprune.core.sampling import shuffled_batches
# pylint: enable=unused-import

# Where Debian's `dataset-*` packages put IDX files, e.g. `apt-get install
# dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist/.
SYSTEM_DATASETS_DIR = "/usr/share/datasets"

# Per-channel (mean, std) of the [0, 1]-scaled pixels: published constants,
# so normalizing leaks nothing about the private data. EMNIST reuses the
# MNIST constants (same acquisition pipeline; no single canonical pair).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "emnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

# Class counts of the named data sets (EMNIST: tfds' default `byclass`).
_NUM_CLASSES = {
    "digits": 10, "mnist": 10, "fashion_mnist": 10, "emnist": 62,
    "cifar10": 10, "cifar100": 100, "svhn_cropped": 10,
}
_IDX_NAMES = ("mnist", "fashion_mnist", "emnist")

DATASET_NAMES = tuple(sorted(_NUM_CLASSES))

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test pair of arrays.

  Attributes:
    name: the data set's name (or the path it was loaded from).
    x_train: float32 images `[N, H, W, C]`, normalized (see module doc).
    y_train: int32 labels `[N]` in `[0, num_classes)`.
    x_test: float32 images `[M, H, W, C]`.
    y_test: int32 labels `[M]`.
    num_classes: number of classes.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  def __post_init__(self):
    for split in ("train", "test"):
      x = getattr(self, f"x_{split}")
      y = getattr(self, f"y_{split}")
      if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(
            f"x_{split} must be a float32 NHWC numpy array, got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} "
            f"{getattr(x, 'shape', '')}")
      if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.ndim != 1:
        raise ValueError(
            f"y_{split} must be an int32 vector, got {type(y).__name__} "
            f"{getattr(y, 'dtype', '')} {getattr(y, 'shape', '')}")
      if len(x) != len(y):
        raise ValueError(
            f"x_{split} has {len(x)} examples but y_{split} has {len(y)}")
      check_finite(f"x_{split}", x)
      outside = (y < 0) | (y >= self.num_classes)
      if outside.any():
        first = int(np.argmax(outside))
        raise ValueError(
            f"{self.name}: y_{split} has {int(outside.sum())} labels outside "
            f"[0, num_classes={self.num_classes}); the first is example "
            f"{first} (label {int(y[first])}). The number of classes comes "
            "from public information only (the data set's metadata, an .npz "
            "file's num_classes array, or the test labels), never from the "
            "private labels, which would make the model's shape depend on "
            "them: give the right num_classes (--num_classes) or fix the "
            "labels")
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"train images {self.x_train.shape[1:]} and test images "
          f"{self.x_test.shape[1:]} differ in shape")

  @property
  def input_shape(self) -> Tuple[int, int, int]:
    """`(H, W, C)` of one image."""
    return tuple(self.x_train.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.y_train)

  @property
  def num_test(self) -> int:
    return len(self.y_test)


def check_finite(name: str, values: np.ndarray) -> None:
  """Refuses NaN or Inf values, with their count and first example index.

  A non-finite input makes an example's gradient non-finite, and
  `C / max(NaN, C)` is NaN: clipping no longer bounds the example.
  """
  values = np.asarray(values)
  if values.dtype.kind not in "fc":
    return
  bad = ~np.isfinite(values.reshape(len(values),
                                    int(np.prod(values.shape[1:]))))
  if bad.any():
    rows = bad.any(axis=1)
    raise ValueError(
        f"{name} has {int(bad.sum())} non-finite values (NaN or Inf) in "
        f"{int(rows.sum())} examples; the first is example "
        f"{int(np.argmax(rows))}. Clean the data: DP-SGD's clipping does not "
        "bound a non-finite example")


def _labels(name: str, labels: np.ndarray) -> np.ndarray:
  """int32 labels `[N]`, refusing non-finite and non-integer values."""
  labels = np.asarray(labels).reshape(-1)
  if labels.dtype.kind not in "biuf":
    raise ValueError(f"{name} must be integer class labels, got dtype "
                     f"{labels.dtype}")
  if labels.dtype.kind == "f":
    check_finite(name, labels)
    if np.any(labels != np.round(labels)):
      first = int(np.argmax(labels != np.round(labels)))
      raise ValueError(f"{name} has non-integer labels; the first is example "
                       f"{first} ({labels[first]!r})")
  info = np.iinfo(np.int32)
  outside = (labels < 0) | (labels > info.max)
  if outside.any():
    first = int(np.argmax(outside))
    raise ValueError(f"{name} has {int(outside.sum())} labels outside [0, "
                     f"{info.max}]; the first is example {first} (label "
                     f"{labels[first]!r}). Class labels are 0, 1, ..., "
                     "num_classes - 1")
  return labels.astype(np.int32)


def content_digests(x: np.ndarray) -> list:
  """One digest per example, invariant to per-channel affine normalization.

  Each example's channels are min-max scaled and quantized to 256 levels
  before hashing, so the same images under `x / 255`, `(x / 255 - mean) /
  std` or raw pixels give the same digests.
  """
  x = np.asarray(x)
  channels = x.shape[-1] if x.ndim >= 3 else 1
  out = []
  for start in range(0, len(x), 4096):  # bounded memory
    chunk = x[start:start + 4096].astype(np.float64)
    chunk = chunk.reshape(len(chunk), -1, channels)
    lo = chunk.min(axis=1, keepdims=True)
    hi = chunk.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    levels = np.round((chunk - lo) / span * 255.0).astype(np.uint8)
    out += [hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            for row in levels.reshape(len(chunk), -1)]
  return out


def overlapping_examples(x_public: np.ndarray,
                         x_private: np.ndarray) -> np.ndarray:
  """Indices of the public examples whose content equals a private one's
  (`content_digests`: whatever per-channel normalization each went
  through)."""
  private = set(content_digests(x_private))
  return np.array([i for i, d in enumerate(content_digests(x_public))
                   if d in private], dtype=np.int64)


# ----------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str, *, ndim: Optional[int] = None) -> np.ndarray:
  """Reads one IDX file (gzip-compressed or not) into a numpy array.

  The header is two zero bytes, a type code (0x08 = uint8, ...) and the
  number of dimensions, then each dimension as a big-endian uint32.

  Args:
    path: the file.
    ndim: if given, the number of dimensions the header must declare (3 for
      images, 1 for labels, i.e. magic numbers 0x803 and 0x801 for uint8).

  Returns:
    The array, in native byte order.

  Raises:
    ValueError: bad magic number, unexpected rank or truncated data.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise ValueError(f"{path}: damaged gzip file ({type(e).__name__}: "
                       f"{e}); it is truncated or corrupted: download or "
                       "copy it again") from e
  if len(raw) < 4:
    raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
  magic = struct.unpack(">I", raw[:4])[0]
  zeros, code, rank = raw[0:2], raw[2], raw[3]
  if zeros != b"\x00\x00" or code not in _IDX_DTYPES:
    raise ValueError(
        f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x00000801 "
        "for labels or 0x00000803 for images); not an IDX file or corrupted")
  if ndim is not None and rank != ndim:
    raise ValueError(
        f"{path}: IDX magic number 0x{magic:08x} declares {rank} dimensions, "
        f"expected {ndim} (magic 0x{0x800 + ndim:08x})")
  header = 4 + 4 * rank
  shape = struct.unpack(f">{rank}I", raw[4:header])
  dtype = _IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
        f"{path}: header declares shape {shape} ({expected} bytes of data) "
        f"but the file holds {len(raw) - header}")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _idx_file(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz",
               stem.replace("-idx", ".idx")):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _missing_idx_files(directory: str, splits) -> list:
  return [stem + ".gz" for split in splits for stem in _IDX_FILES[split]
          if _idx_file(directory, stem) is None]


def _normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (or [0, 255]) pixels -> float32 NHWC, `(x / 255 - mean) / std`."""
  x = pixels.astype(np.float32) / np.float32(255.0)
  if x.ndim == 3:
    x = x[..., None]
  x -= np.asarray(mean, np.float32)
  x /= np.asarray(std, np.float32)
  return x


def load_idx_split(directory: str, split: str = "test", *,
                   mean=(0.0,), std=(1.0,)) -> Tuple[np.ndarray, np.ndarray]:
  """Loads one split of an IDX directory (MNIST file layout).

  Works on directories holding only one split, e.g. the t10k files alone.

  Args:
    directory: holds `train-images-idx3-ubyte[.gz]` and
      `train-labels-idx1-ubyte[.gz]` (split "train") or the `t10k-` pair
      (split "test").
    split: "train" or "test".
    mean: per-channel mean subtracted after scaling to [0, 1].
    std: per-channel std divided by after that; the defaults leave pixels
      in [0, 1].

  Returns:
    `(x, y)`: float32 `[N, H, W, 1]` images and int32 `[N]` labels.

  Raises:
    FileNotFoundError: naming the missing files.
    ValueError: bad magic numbers or inconsistent image/label counts.
  """
  if split not in _IDX_FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  missing = _missing_idx_files(directory, [split])
  if missing:
    raise FileNotFoundError(
        f"IDX directory {directory!r} lacks the {split} split: missing "
        f"{', '.join(missing)}")
  images_stem, labels_stem = _IDX_FILES[split]
  images = read_idx(_idx_file(directory, images_stem), ndim=3)
  labels = read_idx(_idx_file(directory, labels_stem), ndim=1)
  if len(images) != len(labels):
    raise ValueError(
        f"{directory}: {split} has {len(images)} images but {len(labels)} "
        "labels")
  return (_normalize(images, mean, std),
          _labels(f"{directory}: {split} labels", labels))


def _load_idx_dataset(name, directory, mean, std, num_classes=None):
  missing = _missing_idx_files(directory, ["train", "test"])
  if missing:
    hint = ""
    if not _missing_idx_files(directory, ["test"]):
      hint = (" It holds the test split only: use "
              f"tfdpprune.data.load_idx_split({directory!r}, 'test').")
    raise FileNotFoundError(
        f"IDX directory {directory!r} is incomplete: missing "
        f"{', '.join(missing)}.{hint}")
  x_train, y_train = load_idx_split(directory, "train", mean=mean, std=std)
  x_test, y_test = load_idx_split(directory, "test", mean=mean, std=std)
  return Dataset(name, x_train, y_train, x_test, y_test,
                 _public_num_classes(directory, y_test, num_classes))


# ----------------------------------------------------------------------------
# npz, digits, tfds
# ----------------------------------------------------------------------------


def _public_num_classes(source: str, y_test: np.ndarray,
                        num_classes: Optional[int]) -> int:
  """The number of classes from public information only: the caller's
  `num_classes` (a flag, a file's metadata), else the test labels (the test
  set is public under the threat model). Never the private training labels:
  a model with one more logit for one more private label would reveal it.
  """
  if num_classes is not None:
    return int(num_classes)
  if not y_test.size:
    raise ValueError(
        f"{source}: the number of classes cannot be taken from an empty test "
        "set, and never from the private training labels: give num_classes "
        "(--num_classes, or a num_classes array in the .npz file)")
  return int(y_test.max()) + 1


def _npz_images(x: np.ndarray) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"npz images must be [N, H, W] or [N, H, W, C], got "
                     f"shape {x.shape}")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255.0)
  return x.astype(np.float32)


def _load_npz(path: str, num_classes: Optional[int] = None) -> Dataset:
  with np.load(path) as f:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test")
               if k not in f.files]
    if missing:
      raise ValueError(f"{path}: missing arrays {missing} (has {f.files})")
    arrays = {k: f[k] for k in f.files}
  y_train = _labels(f"{path}: y_train", arrays["y_train"])
  y_test = _labels(f"{path}: y_test", arrays["y_test"])
  if num_classes is None and "num_classes" in arrays:
    num_classes = int(arrays["num_classes"])
  return Dataset(path, _npz_images(arrays["x_train"]), y_train,
                 _npz_images(arrays["x_test"]), y_test,
                 _public_num_classes(path, y_test, num_classes))


def _load_digits() -> Dataset:
  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  # pylint: enable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y,
      random_state=_DIGITS_SPLIT_SEED)
  return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def _load_tfds(name: str, data_dir: Optional[str]) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    splits = tfds.as_numpy(tfds.load(
        name, split=["train", "test"], batch_size=-1, as_supervised=True,
        data_dir=data_dir))
  except (OSError, ConnectionError, tfds.core.download.DownloadError) as e:
    offline = (f" or an IDX directory in {SYSTEM_DATASETS_DIR}/"
               f"{name.replace('_', '-')}" if name in _IDX_NAMES else "")
    raise FileNotFoundError(
        f"tensorflow-datasets could not prepare {name!r} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Without "
        "network, give a prepared tensorflow-datasets directory (--data_dir "
        f"or $TFDS_DATA_DIR){offline}.") from e
  (x_train, y_train), (x_test, y_test) = splits
  mean, std = NORMALIZATION[name]
  return Dataset(name, _normalize(x_train, mean, std),
                 np.asarray(y_train, np.int32).reshape(-1),
                 _normalize(x_test, mean, std),
                 np.asarray(y_test, np.int32).reshape(-1), _NUM_CLASSES[name])


def load_dataset(name: str, *, data_dir: Optional[str] = None,
                 num_classes: Optional[int] = None) -> Dataset:
  """Loads a data set by name or path.

  Names: "digits" (embedded, scikit-learn; 1437/360 stratified split with a
  fixed seed), "mnist", "fashion_mnist", "emnist", "cifar10", "cifar100",
  "svhn_cropped". MNIST-like names resolve, in order, to
  1. `data_dir`, an IDX directory (MNIST file names, gzipped or not);
  2. `SYSTEM_DATASETS_DIR/<name with - for _>` if it exists (Debian's
     `dataset-fashion-mnist` installs /usr/share/datasets/fashion-mnist);
  3. tensorflow-datasets (may download; set TFDS_DATA_DIR for its cache).
  The colour sets come from tensorflow-datasets, with `data_dir` as its data
  directory. A name that is not one of these is read as a path: a directory
  of IDX files (normalized to [0, 1]) or a `.npz` file with arrays
  `x_train, y_train, x_test, y_test` (and optionally `num_classes`).

  The number of classes (the model's output size) comes from public
  information only: `num_classes`, else the named data set's or the .npz
  file's metadata, else the largest *test* label + 1 (the test set is public
  under the threat model); a training label outside that range is refused.

  Args:
    name: a data set name or a path.
    data_dir: see above.
    num_classes: the number of classes, overriding the metadata.

  Returns:
    The `Dataset`.

  Raises:
    ValueError: unknown name (the message lists the allowed names); a
      label outside [0, num_classes); damaged files (naming the file).
    FileNotFoundError: an IDX directory lacks files (the message names them).

  Example:
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.num_classes
    ((1437, 8, 8, 1), 10)
  """
  if name == "digits":
    dataset = _load_digits()
  elif name in _IDX_NAMES:
    mean, std = NORMALIZATION[name]
    directory = data_dir
    if directory is None:
      system = os.path.join(SYSTEM_DATASETS_DIR, name.replace("_", "-"))
      directory = system if os.path.isdir(system) else None
    if directory is not None:
      return _load_idx_dataset(name, directory, mean, std,
                               num_classes or _NUM_CLASSES[name])
    dataset = _load_tfds(name, None)
  elif name in _NUM_CLASSES:
    dataset = _load_tfds(name, data_dir)
  elif name.endswith(".npz") and os.path.isfile(name):
    return _load_npz(name, num_classes)
  elif os.path.isdir(name):
    return _load_idx_dataset(name, name, (0.0,), (1.0,), num_classes)
  else:
    raise ValueError(
        f"unknown data set {name!r}: expected one of "
        f"{', '.join(DATASET_NAMES)}, a directory of IDX files or an "
        "existing .npz file")
  if num_classes is not None and num_classes != dataset.num_classes:
    dataset = dataclasses.replace(dataset, num_classes=int(num_classes))
  return dataset


# ----------------------------------------------------------------------------
# Public / private split
# ----------------------------------------------------------------------------


def split_public(dataset: Dataset, public_fraction: float, seed: int
                 ) -> Tuple[Dataset, Tuple[np.ndarray, np.ndarray]]:
  """Splits off a public part of the training set.

  `floor(public_fraction * N)` training examples, chosen uniformly at random
  from `seed`, become public; the rest (in their original order) form the
  private training set, whose size is the N of the privacy accounting. The
  test set stays with the private `Dataset`.

  Args:
    dataset: the full data set.
    public_fraction: in [0, 1).
    seed: seeds the choice of public examples.

  Returns:
    `(private, (x_public, y_public))`.

  Example:
    >>> ds = load_dataset("digits")
    >>> private, (x_pub, _) = split_public(ds, 0.1, seed=0)
    >>> private.num_train, len(x_pub)
    (1294, 143)
  """
  if not 0.0 <= public_fraction < 1.0:
    raise ValueError(
        f"public_fraction must be in [0, 1), got {public_fraction}")
  n = dataset.num_train
  # round() first so that e.g. 0.29 * 100 = 28.999999999999996 gives 29.
  num_public = math.floor(round(public_fraction * n, 9))
  order = np.random.default_rng(seed).permutation(n)
  public = np.sort(order[:num_public])
  private = np.sort(order[num_public:])
  private_ds = dataclasses.replace(
      dataset, x_train=dataset.x_train[private],
      y_train=dataset.y_train[private])
  return private_ds, (dataset.x_train[public], dataset.y_train[public])
