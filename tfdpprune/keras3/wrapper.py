"""`PruneWrapper` for Keras 3 layers (`tfdpprune.wrapping.WrapperMixin`)."""

from tfdpprune import wrapping
from tfdpprune.keras3.compat import keras


@keras.saving.register_keras_serializable(package="tfdpprune")
class PruneWrapper(wrapping.WrapperMixin, keras.layers.Wrapper):
  """Wraps a Keras 3 layer for DP per-example gradients and masks
  (arguments: `tfdpprune.wrapping.WrapperMixin`)."""

  def __init__(self, layer, *args, **kwargs):
    super().__init__(layer, *args, **kwargs)
    # Keras 3 reads a layer's call signature to decide which arguments
    # (`training`, `mask`, ...) to pass and record; the wrapper's call takes
    # whatever its layer's does, so it presents its layer's signature (and a
    # stripped model replays the layer's own call arguments).
    for name in ("_call_signature", "call_signature_parameters",
                 "_call_has_training_arg", "_call_has_mask_arg",
                 "_call_context_args", "_call_has_context_arg"):
      if hasattr(layer, name):
        object.__setattr__(self, name, getattr(layer, name))

  def build(self, input_shape=None):
    super().build(input_shape)
    self._build_masks()
    self.built = True

  def _weight(self, name, shape, dtype, initializer):
    # Masks are also added after build (`tdp.prune(model, config)` on a
    # wrapped model); Keras 3 locks a built layer's state, so unlock it for
    # this weight.
    locked = self._tracker.locked
    self._tracker.unlock()
    try:
      weight = self.add_weight(
          name=name, shape=tuple(shape), dtype=dtype, initializer=initializer,
          trainable=False, aggregation="only_first_replica")
      # An attribute too, so `tf.train.Checkpoint` (which follows
      # attributes) saves it; `.keras` files use `save_own_variables`.
      setattr(self, f"_{name}", weight)
      return weight
    finally:
      if locked:
        self._tracker.lock()

  def _accepted(self, kwargs):
    if self._var_keyword:
      return kwargs
    return {k: v for k, v in kwargs.items() if k in self._call_args}

  def compute_output_spec(self, *args, **kwargs):
    return self.layer.compute_output_spec(*args, **self._accepted(kwargs))

  def compute_output_shape(self, *args, **kwargs):
    return self.layer.compute_output_shape(*args, **kwargs)
