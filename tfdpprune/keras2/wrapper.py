"""`PruneWrapper` for `tf_keras` layers (`tfdpprune.wrapping.WrapperMixin`)."""

from tfdpprune import wrapping
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.compat import tf


@keras.saving.register_keras_serializable(package="tfdpprune")
class PruneWrapper(wrapping.WrapperMixin, keras.layers.Wrapper):
  """Wraps a `tf_keras` layer for DP per-example gradients and masks
  (arguments: `tfdpprune.wrapping.WrapperMixin`)."""

  def build(self, input_shape):
    if not self.layer.built:
      self.layer.build(input_shape)
    super().build(input_shape)
    self._build_masks()

  def _weight(self, name, shape, dtype, initializer):
    return self.add_weight(
        name=name, shape=shape, dtype=dtype, initializer=initializer,
        trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
