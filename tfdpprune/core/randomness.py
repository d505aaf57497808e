"""Who may know which random bits: secret keys for DP, public streams for the rest.

DP-SGD's guarantee assumes the adversary does not know the Gaussian noise nor
which examples Poisson sampling put in each batch. Those two come from
`PrivateRandomness`: by default, fresh 128-bit keys from the operating
system's entropy (`os.urandom`) at every start and resume, held in memory only —
never in a file, a checkpoint, a `.keras` file, a log or a workdir name. An
explicit `noise_seed` makes them reproducible for experiments (and public:
such a run's epsilon only holds against an adversary who does not know the
seed).

`private_key(purpose, noise_seed)` gives both kinds of key.

Everything else (initialization, random mask scores, the public/private
split, public pre-training, the order of public batches and the samples of
Dirichlet pruning) is public and comes from the user's `--seed`.
Public streams are derived with `derived_key(seed, purpose)`, a SHA-256 of the
purpose and the seed, so no two purposes share a stream: a released random
mask says nothing about the sampling keys, even when the same integer is
given as `--seed` and `--noise_seed`.

Keys are `(int64, int64)` pairs used as seeds of TensorFlow's stateless
(Philox) ops; `step_seed(key, i, j)` gives the seed of draw `(i, j)` (e.g.
step and variable index) without reducing the key's 128 bits of entropy.
"""

import hashlib
import os
from typing import Optional, Tuple

from tfdpprune.core._tf import tf

Key = Tuple[int, int]

# Purposes of the derived (public or explicitly seeded) streams.
NOISE, SAMPLING, MASKS = "noise", "sampling", "masks"
# Public streams of the public-data mask methods: the order of public
# batches, and the Dirichlet samples of Dirichlet pruning's inference.
PUBLIC_BATCHES, DIRICHLET = "public_batches", "dirichlet"


def _int64(value: int) -> int:
  """An unsigned 64-bit integer as a signed int64."""
  return value - (1 << 64) if value >= (1 << 63) else value


def secret_key() -> Key:
  """A fresh 128-bit key from the OS's entropy source (`os.urandom`)."""
  raw = os.urandom(16)
  return (_int64(int.from_bytes(raw[:8], "little")),
          _int64(int.from_bytes(raw[8:], "little")))


def derived_key(seed: int, purpose: str) -> Key:
  """The key of `purpose` ("noise", "sampling", "masks", ...) from `seed`.

  SHA-256 of a purpose label and the seed: streams of different purposes are
  unrelated even for equal seeds, and none can be computed from another.
  """
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed={seed!r} must be an integer")
  digest = hashlib.sha256(f"tfdpprune/{purpose}/{seed}".encode()).digest()
  return (_int64(int.from_bytes(digest[:8], "little")),
          _int64(int.from_bytes(digest[8:16], "little")))


def step_seed(key, i, j=0) -> tf.Tensor:
  """The stateless-op seed `[k0 ^ i, k1 ^ j]` of draw `(i, j)` under `key`.

  TensorFlow scrambles both seed words into Philox's key and counter, so all
  128 bits of `key` stay secret-bearing (unlike `stateless_fold_in`, whose
  output depends on the key through 64 bits only).
  """
  key = tf.cast(tf.convert_to_tensor(key), tf.int64)
  return tf.stack([tf.bitwise.bitwise_xor(key[0], tf.cast(i, tf.int64)),
                   tf.bitwise.bitwise_xor(key[1], tf.cast(j, tf.int64))])


def private_key(purpose: str, noise_seed: Optional[int] = None) -> Key:
  """The key of DP noise (`NOISE`) or Poisson sampling (`SAMPLING`).

  Secret (`secret_key()`, fresh at every call) unless `noise_seed` is given;
  then `derived_key(noise_seed, purpose)`, reproducible and public.
  """
  if purpose not in (NOISE, SAMPLING):
    raise ValueError(f"purpose={purpose!r} must be {NOISE!r} or {SAMPLING!r}")
  return secret_key() if noise_seed is None else derived_key(noise_seed,
                                                             purpose)
