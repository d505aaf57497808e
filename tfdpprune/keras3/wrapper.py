"""`PruneWrapper` for Keras 3 layers (`tfdpprune.wrapping.WrapperMixin`)."""

from tfdpprune import wrapping
from tfdpprune.keras3.compat import keras


@keras.saving.register_keras_serializable(package="tfdpprune")
class PruneWrapper(wrapping.WrapperMixin, keras.layers.Wrapper):
  """Wraps a Keras 3 layer for DP per-example gradients and masks
  (arguments: `tfdpprune.wrapping.WrapperMixin`)."""

  def build(self, input_shape=None):
    super().build(input_shape)
    self._build_masks()
    self.built = True

  def _weight(self, name, shape, dtype, initializer):
    return self.add_weight(
        name=name, shape=tuple(shape), dtype=dtype, initializer=initializer,
        trainable=False, aggregation="only_first_replica")

  def call(self, inputs, *args, training=None, mask=None, **kwargs):
    # Keras 3 passes `training` and `mask` only to calls that name them.
    if training is not None:
      kwargs["training"] = training
    if mask is not None:
      kwargs["mask"] = mask
    return super().call(inputs, *args, **kwargs)
