"""Shared test set-up: quiet TensorFlow and prepare the Keras 2 stack."""
import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The data-fingerprint key of the privacy ledger: a throwaway one for the
# tests (and their subprocesses), not the user's ~/.config key.
os.environ["TFDPPRUNE_FINGERPRINT_KEY_FILE"] = os.path.join(
    tempfile.mkdtemp(prefix="tfdpprune-tests-"), "fingerprint.key")

import tfdpprune  # noqa: E402,F401  (prepares tf_keras before any test imports TF)


@pytest.fixture
def drawn_keys(monkeypatch):
  """The list of every secret key drawn during the test (a spy)."""
  from tfdpprune import randomness  # pylint: disable=g-import-not-at-top
  drawn, real = [], randomness.secret_key

  def spy():
    drawn.append(real())
    return drawn[-1]
  monkeypatch.setattr(randomness, "secret_key", spy)
  return drawn


def _key_encodings(keys):
  out = []
  for key in keys:
    for k in key:
      out += [k.to_bytes(8, "little", signed=True),
              k.to_bytes(8, "big", signed=True), str(k).encode(),
              format(k % 2**64, "x").encode()]
  return out


def _files_holding(root, keys):
  """Files under `root` whose bytes contain one of the keys (any encoding)."""
  patterns = _key_encodings(keys)
  found = []
  for directory, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(directory, name), "rb") as f:
        content = f.read()
      if any(p in content for p in patterns):
        found.append(os.path.join(directory, name))
  return found


@pytest.fixture
def key_files_holding():
  """`(root, keys) -> files` holding a key: an attacker's search."""
  return _files_holding


class SpyDataset:
  """A tf.data pipeline of `(x, y)` batches that counts the examples read
  (to show a mask method reads only the data set it is given)."""

  def __init__(self, x, y, batch_size=4):
    from tfdpprune._compat import tf  # pylint: disable=g-import-not-at-top
    self.reads = 0

    def gen():
      for i in range(len(x)):
        self.reads += 1
        yield x[i], y[i]
    self.dataset = tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec(x.shape[1:], tf.float32),
                               tf.TensorSpec((), tf.int64))).batch(batch_size)


@pytest.fixture
def spy_dataset():
  """`SpyDataset(x, y, batch_size)`."""
  return SpyDataset
