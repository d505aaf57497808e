"""The Keras 3 private model (`tdp.make_private` on a Keras 3 model)."""

from tfdpprune import private_model
from tfdpprune.keras3 import masked_update
from tfdpprune.keras3.compat import keras
from tfdpprune.keras3.compat import tf


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
    optimizer = self.base_optimizer
    masked_update.check(optimizer)
    if not optimizer.built:
      optimizer.build(self.model.trainable_variables)

  def _slots(self, var):
    return masked_update.slots(self.base_optimizer, var)

  def _apply(self, grads, variables):
    self.base_optimizer.apply(grads, variables)

  def _track_loss(self, x, y, y_pred, sample_weight, rows):
    weight = (tf.cast(tf.size(rows), rows.dtype) if sample_weight is None
              else tf.reduce_sum(tf.cast(sample_weight, rows.dtype)))
    self._loss_tracker.update_state(
        tf.math.divide_no_nan(tf.reduce_sum(rows), weight),
        sample_weight=weight)
    self.compute_metrics(x, y, y_pred, sample_weight)
