"""Fixed 2-D scattering features (Mallat 2012; Bruna & Mallat 2013).

Tramer & Boneh (2021, "Differentially Private Learning Needs Better
Features") train DP-SGD on ScatterNet features: a fixed, data-independent
cascade of Morlet wavelet convolutions, moduli and a Gaussian low-pass. The
features cost no privacy (no parameter is fitted to any data), and a linear
model on them beats end-to-end CNNs at small epsilon because DP-SGD only
noises the few parameters on top.

For `J` scales and `L` orientations each input channel gives
`1 + J*L + L*L*J*(J-1)/2` channels (81 for J=2, L=8) at a resolution reduced
by `2**J` (28x28 -> 7x7):

- order 0: `x * phi`,
- order 1: `|x * psi_{j1,t1}| * phi`,
- order 2: `||x * psi_{j1,t1}| * psi_{j2,t2}| * phi` for `j2 > j1`,

each low-passed by `phi` and subsampled by `2**J`. The Morlet and Gaussian
filters follow the usual definitions (sigma 0.8 * 2**j, centre frequency
3 pi / 4 / 2**j, slant 4 / L; low-pass sigma 0.8 * 2**(J-1)); convolutions
are products in the Fourier domain, after reflect-padding by `2**J`.

The reference implementation, kymatio 0.3.0 (its latest release), cannot be
imported with the SciPy this project pins (it imports the removed
`scipy.special.sph_harm`), so the transform is written here, in vectorized
TensorFlow.

```python
from tfdpprune import scattering
features = scattering.transform(images)   # [N, 28, 28, 1] -> [N, 7, 7, 81]
layer = scattering.Scattering2D()         # the same map as a Keras layer
```
"""

import math
import os
import tempfile
from typing import Optional

import numpy as np

from tfdpprune import ledger
from tfdpprune._compat import keras
from tfdpprune._compat import tf


def num_channels(J: int, L: int) -> int:
  """Output channels per input channel: `1 + J*L + L*L*J*(J-1)/2`."""
  return 1 + J * L + L * L * J * (J - 1) // 2


def _gabor(size: int, sigma: float, theta: float, xi: float,
           slant: float) -> np.ndarray:
  """A periodized 2-D Gabor filter on a `size x size` grid, origin at [0, 0]."""
  c, s = math.cos(theta), math.sin(theta)
  rot = np.array([[c, -s], [s, c]])
  curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
  coords = np.arange(size, dtype=np.float64)
  out = np.zeros((size, size), np.complex128)
  for dx in (-2, -1, 0, 1, 2):      # periodization: wrap the tails around
    for dy in (-2, -1, 0, 1, 2):
      x = coords[:, None] + dx * size
      y = coords[None, :] + dy * size
      quad = curv[0, 0] * x * x + (curv[0, 1] + curv[1, 0]) * x * y + (
          curv[1, 1] * y * y)
      out += np.exp(-quad + 1j * xi * (x * c + y * s))
  return out * slant / (2 * math.pi * sigma * sigma)


def _morlet(size, sigma, theta, xi, slant):
  """A zero-mean Morlet: a Gabor minus its envelope times the Gabor's mean."""
  wave = _gabor(size, sigma, theta, xi, slant)
  envelope = _gabor(size, sigma, theta, 0.0, slant)
  return wave - envelope * (wave.sum() / envelope.sum())


def filter_bank(size: int, J: int, L: int):
  """`(phi_hat [size, size], psi_hat [J, L, size, size])`: the low-pass and
  the Morlet wavelets in the Fourier domain (real: the filters are
  conjugate-symmetric)."""
  phi = _gabor(size, 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)
  psi = np.stack([
      np.stack([
          _morlet(size, 0.8 * 2 ** j, (L // 2 - 1 - t) * math.pi / L,
                  0.75 * math.pi / 2 ** j, 4.0 / L)
          for t in range(L)])
      for j in range(J)])
  return (np.fft.fft2(phi).real.astype(np.float32),
          np.fft.fft2(psi).real.astype(np.float32))


@keras.utils.register_keras_serializable(package="tfdpprune")
class Scattering2D(keras.layers.Layer):
  """Scattering features of NHWC images: `[B, H, W, C] -> [B, H/2**J,
  W/2**J, C * num_channels(J, L)]` (channels of one input channel are
  adjacent: order 0, order 1 by (j1, t1), order 2 by (j1, t1, j2, t2)).

  No weights: a fixed, public map. H and W must be multiples of `2**J`.

  Example:
    >>> Scattering2D(J=2, L=8)(tf.zeros([1, 28, 28, 1])).shape
    TensorShape([1, 7, 7, 81])
  """

  def __init__(self, J: int = 2, L: int = 8, **kwargs):
    kwargs["trainable"] = False
    super().__init__(**kwargs)
    if not (isinstance(J, int) and 1 <= J <= 4):
      raise ValueError(f"J={J!r} must be an integer in [1, 4]")
    if not (isinstance(L, int) and 1 <= L <= 16):
      raise ValueError(f"L={L!r} must be an integer in [1, 16]")
    self.J, self.L = J, L

  def build(self, input_shape):
    h, w = int(input_shape[1]), int(input_shape[2])
    step = 2 ** self.J
    if h % step or w % step or h != w:
      raise ValueError(f"Scattering2D(J={self.J}) needs square images whose "
                       f"side is a multiple of {step}, got {h}x{w}")
    self._size = h + 2 * step
    phi, psi = filter_bank(self._size, self.J, self.L)
    self._phi = tf.constant(phi)
    self._psi = tf.constant(psi)
    super().build(input_shape)

  def _lowpass(self, u_hat):
    """Real part of `u * phi`, subsampled by 2**J and cropped to the image.

    Subsampling is a periodization of the spectrum, so the inverse FFT runs
    at the low resolution."""
    step = 2 ** self.J
    size = self._size // step
    y = u_hat * tf.cast(self._phi, tf.complex64)
    shape = tf.shape(y)
    y = tf.reshape(y, tf.concat([shape[:-2], [step, size, step, size]], 0))
    y = tf.reduce_mean(y, axis=[-4, -2])
    return tf.math.real(tf.signal.ifft2d(y))[..., 1:-1, 1:-1]

  def call(self, x):
    b, h, w, c = tf.unstack(tf.shape(x))
    step = 2 ** self.J
    x = tf.transpose(tf.cast(x, tf.float32), [0, 3, 1, 2])   # [B, C, H, W]
    x = tf.pad(x, [[0, 0], [0, 0], [step, step], [step, step]],
               mode="REFLECT")
    x_hat = tf.signal.fft2d(tf.cast(x, tf.complex64))
    psi = tf.cast(self._psi, tf.complex64)                   # [J, L, S, S]
    orders = [self._lowpass(x_hat)[:, :, None]]              # [B, C, 1, ., .]
    u1 = tf.abs(tf.signal.ifft2d(x_hat[:, :, None, None] * psi))
    u1_hat = tf.signal.fft2d(tf.cast(u1, tf.complex64))      # [B,C,J,L,S,S]
    s1 = self._lowpass(u1_hat)
    orders.append(tf.reshape(s1, [b, c, self.J * self.L, h // step,
                                  w // step]))
    for j1 in range(self.J - 1):
      # [B, C, L, 1, 1, S, S] x [J - j1 - 1, L, S, S]: every coarser j2 > j1.
      u2 = tf.abs(tf.signal.ifft2d(
          u1_hat[:, :, j1, :, None, None] * psi[None, j1 + 1:]))
      s2 = self._lowpass(tf.signal.fft2d(tf.cast(u2, tf.complex64)))
      orders.append(tf.reshape(
          s2, [b, c, self.L * (self.J - j1 - 1) * self.L, h // step,
               w // step]))
    out = tf.concat(orders, axis=2)                          # [B, C, K, h, w]
    out = tf.transpose(out, [0, 3, 4, 1, 2])
    return tf.reshape(out, [b, h // step, w // step,
                            c * num_channels(self.J, self.L)])

  def compute_output_shape(self, input_shape):
    step = 2 ** self.J
    return tf.TensorShape([input_shape[0], input_shape[1] // step,
                           input_shape[2] // step,
                           input_shape[3] * num_channels(self.J, self.L)])

  def get_config(self):
    return {**super().get_config(), "J": self.J, "L": self.L}


def transform(x: np.ndarray, *, J: int = 2, L: int = 8,
              batch_size: Optional[int] = None,
              progress: Optional[str] = None,
              cache_dir: Optional[str] = None) -> np.ndarray:
  """Scattering features of float32 NHWC images, computed in batches.

  Args:
    x: `[N, H, W, C]` float32 images.
    J: number of scales (resolution reduced by `2**J`).
    L: number of orientations.
    batch_size: examples per batch; default: about 500 for 28x28x1 at
      J=2, L=8 (about 3 MB per example), fewer for larger images, so a
      batch stays near 1.5 GB.
    progress: a label to show a tqdm progress bar under, or None.
    cache_dir: a directory to keep the features in, named by a keyed digest
      (HMAC-SHA256 under the user's fingerprint key, `ledger.fingerprint`)
      of `x`, J and L, so the next run skips the computation (about 2
      minutes for Fashion-MNIST on 2 CPU cores). The files are as private
      as the images: never a run directory, which is released (the trainer
      refuses one).

  Returns:
    `[N, H/2**J, W/2**J, C * num_channels(J, L)]` float32 features.
  """
  if cache_dir is None:
    return _compute(x, J, L, batch_size, progress)
  # Keyed (HMAC under the user's fingerprint key), so a file name is no
  # membership oracle: a plain hash of the images would let anyone who knows
  # all but one example test which data set was used.
  digest = ledger.fingerprint(np.ascontiguousarray(x, np.float32),
                              salt=f"scattering|J={J}|L={L}|v2")
  path = os.path.join(cache_dir, f"scattering-{digest[:32]}.npy")
  if os.path.exists(path):
    return np.load(path)
  features = _compute(x, J, L, batch_size, progress)
  os.makedirs(cache_dir, mode=0o700, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
  with os.fdopen(fd, "wb") as f:
    np.save(f, features)
  os.replace(tmp, path)
  return features


def _compute(x, J, L, batch_size, progress):
  if batch_size is None:
    # The second-order moduli dominate: C * L * L * J(J-1)/2 complex maps of
    # the padded size per example.
    side = max(x.shape[1], x.shape[2]) + 2 * 2 ** J
    maps = x.shape[3] * max(1, L * L * J * (J - 1) // 2 + J * L)
    batch_size = max(1, int(4e7 // (maps * side * side)))
  layer = Scattering2D(J=J, L=L)
  layer.build(x.shape)
  fn = tf.function(layer.call, reduce_retracing=True)
  batches = range(0, len(x), batch_size)
  if progress is not None:
    import tqdm   # pylint: disable=import-outside-toplevel
    batches = tqdm.tqdm(batches, desc=progress, unit="batch", leave=False)
  out = [fn(tf.constant(x[i:i + batch_size])).numpy() for i in batches]
  if not out:
    return np.zeros((0,) + tuple(layer.compute_output_shape(
        (None,) + x.shape[1:])[1:]), np.float32)
  return np.concatenate(out).astype(np.float32)
