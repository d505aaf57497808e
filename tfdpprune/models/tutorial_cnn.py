"""The CNN of TF Privacy's MNIST DP-SGD tutorial."""

from tfdpprune.models import _common


def tutorial_cnn(input_shape, num_classes: int, *,
                 activation: str = "relu", keras=None):
  """TF Privacy's MNIST tutorial CNN, producing logits.

  Conv2D(16, 8, strides=2, 'same') -> MaxPool2D(2, 1) -> Conv2D(32, 4,
  strides=2, 'valid') -> MaxPool2D(2, 1) -> Flatten -> Dense(32) ->
  Dense(num_classes). On small inputs (e.g. 8x8 digits) the second conv and
  the pools switch to 'same' padding wherever their window would not fit;
  on 28x28 MNIST the model is exactly the tutorial's (4x4x32 before Flatten).

  Args:
    input_shape: `(H, W, C)`.
    num_classes: number of logits.
    activation: hidden activation (the tutorial's is relu).
    keras: the Keras module to build with (default `tf_keras`).

  Returns:
    An uncompiled functional `keras.Model` named "tutorial_cnn".

  Example:
    >>> model = tutorial_cnn((28, 28, 1), 10)
    >>> model.output_shape
    (None, 10)
  """
  keras = _common.keras_module(keras)
  _common.check_num_classes(num_classes)
  inputs = _common.image_input(input_shape, keras=keras)
  h = keras.layers.Conv2D(16, 8, strides=2, padding="same",
                          activation=activation, name="conv1")(inputs)
  h = keras.layers.MaxPool2D(2, 1, padding=_common.padding_for(h, 2),
                             name="pool1")(h)
  h = keras.layers.Conv2D(32, 4, strides=2, padding=_common.padding_for(h, 4),
                          activation=activation, name="conv2")(h)
  h = keras.layers.MaxPool2D(2, 1, padding=_common.padding_for(h, 2),
                             name="pool2")(h)
  h = keras.layers.Flatten(name="flatten")(h)
  h = keras.layers.Dense(32, activation=activation, name="dense1")(h)
  logits = keras.layers.Dense(num_classes, name="logits")(h)
  return keras.Model(inputs, logits, name="tutorial_cnn")
