"""Keras-native DP training: a Poisson-sampled input and a one-call setup.

`poisson_dataset` is the input `model.fit` needs for the accountant's
assumption to hold; `make_private_with_epsilon` (in the spirit of Opacus'
`PrivacyEngine.make_private_with_epsilon`) calibrates the noise multiplier to
a target epsilon and builds the optimizer, the Poisson input and the
`PrivacyCallback` from one set of numbers, so N, B, sigma and the steps are
never typed twice.

```python
import tfdpprune as tdp
keras = tdp.keras
private = tdp.make_private_with_epsilon(
    model, x_train, y_train, target_epsilon=3.0, epochs=20, batch_size=256,
    learning_rate=0.1, momentum=0.9)
private.compile(keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=keras.losses.Reduction.NONE),
    metrics=["accuracy"])
private.fit(validation_data=(x_test, y_test))
print(private.callback.epsilon)            # <= 3.0
```
"""

import dataclasses
import math
from typing import Optional

from tfdpprune import accounting
from tfdpprune import data as data_lib
from tfdpprune import frontends
from tfdpprune import private_model
from tfdpprune import pruning
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.callbacks import PrivacyCallback
from tfdpprune.optimizer import MaskedDPKerasAdamOptimizer
from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer

_OPTIMIZERS = {"sgd": MaskedDPKerasSGDOptimizer,
               "adam": MaskedDPKerasAdamOptimizer}


def poisson_dataset(x, y, batch_size: int, *, epochs: Optional[float] = None,
                    steps: Optional[int] = None, seed: Optional[int] = None,
                    max_batch_size: Optional[int] = None,
                    augmult: int = 1,
                    pad_to: Optional[int] = None) -> tf.data.Dataset:
  """Poisson-sampled batches of expected size `batch_size` for `model.fit`.

  Every step, each example joins the batch independently with probability
  q = batch_size / N (secret sampling unless `seed` is given); batch sizes
  vary. Give `epochs` (steps = ceil(epochs / q)) or `steps`. The dataset
  carries its `data.PoissonSpec`, which `PrivacyCallback(dataset=...)`
  checks. Use the optimizer with `expected_batch_size=batch_size` (and
  `augmentation_multiplicity=augmult` with `augmult` augmented copies of
  every example, images only). `pad_to` gives every batch the same static
  shape for XLA (`(x, y, w)`, padding rows of weight 0; the truncation at
  `pad_to` is accounted, see `data.poisson_batches` and
  `accounting.poisson_capacity`).

  Raises:
    ValueError: naming the argument, for a bad batch size or step count.
  """
  n = len(y)
  if not (isinstance(batch_size, int) and 1 <= batch_size <= n):
    raise ValueError(f"batch_size={batch_size!r} must be an integer in "
                     f"[1, N={n}]")
  if (epochs is None) == (steps is None):
    raise ValueError(f"give exactly one of epochs or steps; got epochs="
                     f"{epochs!r}, steps={steps!r}")
  if steps is None:
    steps = accounting.steps_for(n, batch_size, epochs)
  return data_lib.poisson_batches(x, y, batch_size / n, int(steps), seed=seed,
                                  max_batch_size=max_batch_size,
                                  augmult=augmult, pad_to=pad_to)


@dataclasses.dataclass
class PrivateTraining:
  """What `make_private_with_epsilon` built, consistent by construction.

  Attributes:
    model: a Keras 2 model prepared by `tdp.prune` (fast per-example
      gradients), or a Keras 3 private model (`tdp.make_private`).
    optimizer: the masked DP optimizer (Keras 2, sigma calibrated), or the
      Keras 3 optimizer of the private model.
    dataset: the Poisson-sampled training input.
    callback: the `PrivacyCallback` (epsilon in the logs; budget stop).
    noise_multiplier: the calibrated sigma.
    steps: optimizer steps of the whole run.
    epochs, steps_per_epoch: for `model.fit`.
  """
  model: object
  optimizer: object
  dataset: tf.data.Dataset
  callback: PrivacyCallback
  noise_multiplier: float
  steps: int
  epochs: int
  steps_per_epoch: int

  def compile(self, loss, **kwargs):
    """`model.compile` with the optimizer and a standard Keras loss (on
    Keras 2 the DP optimizer gets it without reduction: one loss per
    example)."""
    if (not hasattr(self.model, "noise_multiplier") and
        isinstance(loss, keras.losses.Loss) and loss.reduction != "none"):
      loss = type(loss).from_config({**loss.get_config(), "reduction": "none"})
    self.model.compile(optimizer=self.optimizer, loss=loss, **kwargs)

  def fit(self, callbacks=(), **kwargs):
    """`model.fit` on the Poisson input, with the privacy callback."""
    kwargs.setdefault("shuffle", False)  # Poisson batches: nothing to shuffle
    return self.model.fit(self.dataset, epochs=self.epochs,
                          steps_per_epoch=self.steps_per_epoch,
                          callbacks=[self.callback, *callbacks], **kwargs)


def make_private(model, *, l2_norm_clip: float, noise_multiplier: float,
                 expected_batch_size: float, noise_seed: Optional[int] = None,
                 augmentation_multiplicity: int = 1,
                 physical_batch_size: Optional[int] = None):
  """A model whose `fit`, `train_on_batch` and `evaluate` work as usual and
  whose every training step is a masked DP-SGD step.

  Each step takes per-example losses from the compiled (standard) Keras
  loss, the per-example gradients of the selected coordinates (masks from
  `tdp.prune`), clips them jointly to `l2_norm_clip`, sums them, adds
  Gaussian noise `noise_multiplier * l2_norm_clip` once on the selected
  coordinates, divides by `expected_batch_size`, and applies the compiled
  optimizer (any optimizer of the model's Keras) with unselected
  coordinates and their optimizer state kept still.

  ```python
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.1,
                             expected_batch_size=256)
  private.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  batches = tdp.poisson_dataset(x, y, batch_size=256, epochs=10)
  private.fit(batches, callbacks=[tdp.PrivacyCallback(
      len(y), 256, noise_multiplier=1.1, dataset=batches)])
  ```

  Args:
    model: a built Keras 3 (TensorFlow backend) or Keras 2 model.
    l2_norm_clip: C > 0.
    noise_multiplier: sigma >= 0.
    expected_batch_size: B > 0 (Poisson batches: their realized size is
      private).
    noise_seed: None (secret noise) or an integer (experiments only).
    augmentation_multiplicity: K >= 1 augmented rows per example.
    physical_batch_size: None, or P: every logical batch is processed in
      chunks of at most P examples within its one step (clipped sums
      accumulated in float32, noise once, divided by B), so memory does not
      grow with B; the mechanism, and epsilon, are those of the unsplit
      step.
  """
  return private_model.make_private(
      frontends.of(model).private_class, model, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier,
      expected_batch_size=expected_batch_size, noise_seed=noise_seed,
      augmentation_multiplicity=augmentation_multiplicity,
      physical_batch_size=physical_batch_size)


def make_private_with_epsilon(
    model: keras.Model, x, y, *, target_epsilon: float, epochs: float,
    batch_size: int, delta: float = 1e-5, l2_norm_clip: float = 1.0,
    optimizer: str = "sgd", learning_rate: float = 0.1,
    accountant: str = "rdp", prune=None, public_data=None,
    noise_seed: Optional[int] = None, augmult: int = 1,
    physical_batch_size: Optional[int] = None,
    **optimizer_kwargs) -> PrivateTraining:
  """Calibrates sigma to `target_epsilon` and builds every DP piece.

  Args:
    model: a built Sequential or functional model, Keras 3 or Keras 2
      (wrapped with `tdp.prune`, which also applies `prune`). A Keras 3
      model becomes a private model (`tdp.make_private`) trained by a Keras
      3 optimizer; a Keras 2 model keeps its layers and gets the masked DP
      optimizer.
    x, y: the private training data (N = len(y)).
    target_epsilon: epsilon after `epochs` epochs, at `delta`.
    epochs: training length (steps = ceil(epochs * N / batch_size)).
    batch_size: the expected (Poisson) batch size B; q = B / N.
    delta: in (0, 1/N).
    l2_norm_clip: C.
    optimizer: "sgd" or "adam".
    learning_rate, **optimizer_kwargs: for the optimizer (e.g. momentum).
    accountant: "rdp" or "pld".
    prune: optional `tdp.PruneConfig` (or several).
    public_data: public examples for public-data mask methods.
    noise_seed: None (secret noise and sampling) or a seed (experiments).
    augmult: augmentation multiplicity K (images): K augmented copies of
      every sampled example, their mean gradient clipped as one.
    physical_batch_size: None, or P: each logical batch is processed in
      chunks of at most P examples (`tdp.make_private`); a Keras 2 model then
      becomes a private model too (its optimizer could not chunk a batch).

  Returns:
    A `PrivateTraining`; call `.compile(loss)` (a standard Keras loss) then
    `.fit()`.
  """
  n = len(y)
  if optimizer not in _OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r} must be 'sgd' or 'adam'")
  fe = frontends.of(model)
  private_step = fe.name == "keras3" or physical_batch_size is not None
  if not 0 < delta < 1.0 / n:
    raise ValueError(f"delta={delta!r} must be in (0, 1/N = {1.0 / n:.3g})")
  steps = accounting.steps_for(n, batch_size, epochs)
  sigma = accounting.compute_noise_multiplier(
      target_epsilon, n, batch_size, steps=steps, delta=delta,
      accountant=accountant)
  model = pruning.prune(model, prune, public_data=public_data)
  if private_step:
    model = make_private(model, l2_norm_clip=l2_norm_clip,
                         noise_multiplier=sigma, expected_batch_size=batch_size,
                         noise_seed=noise_seed,
                         augmentation_multiplicity=augmult,
                         physical_batch_size=physical_batch_size)
    keras_optimizers = (fe.keras.optimizers if fe.name == "keras3" else
                        fe.keras.optimizers.legacy)
    opt = (keras_optimizers.SGD if optimizer == "sgd" else
           keras_optimizers.Adam)(learning_rate=learning_rate,
                                  **optimizer_kwargs)
  else:
    opt = _OPTIMIZERS[optimizer](
        l2_norm_clip, sigma, learning_rate=learning_rate,
        expected_batch_size=batch_size, noise_seed=noise_seed,
        augmentation_multiplicity=augmult, **optimizer_kwargs)
  dataset = poisson_dataset(x, y, batch_size, steps=steps, seed=noise_seed,
                            augmult=augmult)
  callback = PrivacyCallback(n, batch_size, sigma, delta=delta,
                             target_epsilon=target_epsilon,
                             accountant=accountant, dataset=dataset)
  fit_epochs = max(1, int(math.ceil(epochs - 1e-9)))
  return PrivateTraining(model, opt, dataset, callback, float(sigma), steps,
                         fit_epochs, int(math.ceil(steps / fit_epochs)))
