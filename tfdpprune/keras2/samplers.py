"""The samplers of `tf_keras` layer classes (one registration per class)."""

from tfdpprune.core import samplers
from tfdpprune.keras2.compat import keras

samplers.register_keras_layers(keras.layers, keras.backend.rnn)
