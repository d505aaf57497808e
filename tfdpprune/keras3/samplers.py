"""The samplers of Keras 3 layer classes (one registration per class)."""

from tfdpprune.core import samplers
from tfdpprune.keras3.compat import keras
from tfdpprune.keras3.compat import rnn

samplers.register_keras_layers(keras.layers, rnn)
