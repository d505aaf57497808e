"""The Keras 3 private model (`tdp.make_private` on a Keras 3 model)."""

from typing import Optional

from tfdpprune import frontends
from tfdpprune import private_model
from tfdpprune.keras3 import masked_update
from tfdpprune.keras3.compat import keras


@keras.saving.register_keras_serializable(package="tfdpprune")
class PrivateModel(private_model.PrivateModelMixin, keras.Model):
  """A Keras 3 model whose train step is masked DP-SGD
  (`tfdpprune.private_model`)."""

  def _step_counter(self, initial):
    return self.add_weight(
        name="dp_iterations", shape=(), dtype="int64",
        initializer=keras.initializers.Constant(initial), trainable=False,
        aggregation="only_first_replica")

  def _check_optimizer(self):
    masked_update.check(self.optimizer)
    if not self.optimizer.built:
      self.optimizer.build(self.model.trainable_variables)

  def _slots(self, var):
    return masked_update.slots(self.optimizer, var)

  def _apply(self, grads, variables):
    self.optimizer.apply(grads, variables)

  def _track_loss(self, x, y, y_pred, sample_weight, rows):
    self._loss_tracker.update_state(
        keras.ops.mean(rows), sample_weight=keras.ops.shape(rows)[0])
    return self.compute_metrics(x, y, y_pred, sample_weight)


def make_private(model, *, l2_norm_clip: float, noise_multiplier: float,
                 expected_batch_size: float, noise_seed: Optional[int] = None,
                 augmentation_multiplicity: int = 1) -> PrivateModel:
  """`tdp.make_private` for a Keras 3 model (see there)."""
  if frontends.of(model).name != "keras3":
    raise TypeError(f"{type(model).__name__} is not a Keras 3 model")
  return private_model.make_private(
      PrivateModel, model, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier,
      expected_batch_size=expected_batch_size, noise_seed=noise_seed,
      augmentation_multiplicity=augmentation_multiplicity)
