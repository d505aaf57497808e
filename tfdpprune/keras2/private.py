"""The Keras 2 private model (`tdp.make_private` on a `tf_keras` model).

The same DP step as Keras 3's (`tfdpprune.private_model`), in the train step
of a `tf_keras.Model`, with any `tf_keras` optimizer (legacy or not). The TF
Privacy optimizer subclasses (`tdp.MaskedDPKerasSGDOptimizer`, ...) remain the
"use it as a Keras optimizer" path; they are refused here (the step would be
noised twice).
"""

from tfdpprune import private_model
from tfdpprune.keras2 import dp_gradients
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.compat import tf


@keras.saving.register_keras_serializable(package="tfdpprune")
class PrivateModel(private_model.PrivateModelMixin, keras.Model):
  """A `tf_keras` model whose train step is masked DP-SGD
  (`tfdpprune.private_model`)."""

  def _step_counter(self, initial):
    return self.add_weight(
        name="dp_iterations", shape=(), dtype=tf.int64,
        initializer=keras.initializers.Constant(initial), trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def _check_optimizer(self):
    optimizer = self.base_optimizer
    if isinstance(optimizer, dp_gradients.MaskedDPGradients):
      raise ValueError(
          f"{type(optimizer).__name__} is a DP optimizer, and the private "
          "model's step is DP already: compile it with a plain Keras "
          "optimizer (keras.optimizers.SGD, Adam, ...)")
    variables = self.model.trainable_variables
    if isinstance(optimizer, keras.optimizers.legacy.Optimizer):
      optimizer._create_all_weights(variables)  # pylint: disable=protected-access
    elif not getattr(optimizer, "_built", False):
      optimizer.build(variables)

  def _slots(self, var):
    optimizer = self.base_optimizer
    if isinstance(optimizer, keras.optimizers.legacy.Optimizer):
      return [optimizer.get_slot(var, name)
              for name in optimizer.get_slot_names()]
    index = optimizer._index_dict[optimizer._var_key(var)]  # pylint: disable=protected-access
    count = len(optimizer._index_dict)  # pylint: disable=protected-access
    return [value[index] for name, value in vars(optimizer).items()
            if name not in ("_variables", "_trainable_variables") and
            isinstance(value, (list, tuple)) and len(value) == count and
            all(v is None or hasattr(v, "assign") for v in value) and
            value[index] is not None]

  def _apply(self, grads, variables):
    self.base_optimizer.apply_gradients(zip(grads, variables))

  def _track_loss(self, x, y, y_pred, sample_weight, rows):
    del rows
    self.compiled_loss(y, y_pred, sample_weight)
    self.compiled_metrics.update_state(y, y_pred, sample_weight)
