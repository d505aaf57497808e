"""Model registry, architectures and the DP-compatibility check."""

import numpy as np
import pytest

from tfdpprune import models
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.models import tempered_sigmoid_cnn as tempered_lib

NUM_CLASSES = 7

# Layer types the pruning wrappers and per-example samplers understand, plus
# weightless layers.
_ALLOWED = {"InputLayer", "Conv2D", "Dense", "GroupNormalization",
            "LayerNormalization", "Activation", "TemperedSigmoid",
            "MaxPooling2D", "AveragePooling2D", "Add", "Flatten",
            "GlobalAveragePooling2D"}

_CASES = [
    ("tutorial_cnn", (28, 28, 1)),
    ("tutorial_cnn", (8, 8, 1)),
    ("tempered_sigmoid_cnn", (28, 28, 1)),
    ("tempered_sigmoid_cnn", (8, 8, 1)),
    ("tempered_sigmoid_cnn", (32, 32, 3)),
    ("mlp", (8, 8, 1)),
    ("wide_resnet", (8, 8, 1)),
    ("wrn16_4", (32, 32, 3)),
    ("resnet_small", (8, 8, 1)),
    ("resnet_small", (28, 28, 1)),
]


@pytest.fixture(name="scratch_registry")
def _scratch_registry(monkeypatch):
  """A copy of the registry, so registrations in a test do not leak."""
  registry = dict(models._REGISTRY)  # pylint: disable=protected-access
  monkeypatch.setattr(models, "_REGISTRY", registry)
  return registry


def test_available_models_lists_every_architecture():
  assert models.available_models() == sorted(
      ["linear", "mlp", "resnet_small", "tempered_sigmoid_cnn", "tutorial_cnn",
       "wide_resnet", "wrn16_4"])


def test_duplicate_name_is_refused(scratch_registry):
  with pytest.raises(ValueError, match="'tutorial_cnn' is already registered"):
    models.register("tutorial_cnn")(lambda input_shape, num_classes: None)

  @models.register("my_linear")
  def linear(input_shape, num_classes):
    return models.get_model("mlp", input_shape, num_classes, hidden=())

  assert "my_linear" in models.available_models()
  assert "my_linear" in scratch_registry
  assert models.get_model("my_linear", (3,), 2).count_params() == 3 * 2 + 2
  with pytest.raises(ValueError, match="already registered"):
    models.register("my_linear")(linear)


def test_unknown_model_lists_available():
  with pytest.raises(ValueError, match="unknown model 'vgg'.*tutorial_cnn"):
    models.get_model("vgg", (8, 8, 1), 10)


@pytest.mark.parametrize("name,input_shape", _CASES)
def test_model_outputs_logits_of_num_classes(name, input_shape):
  tf.random.set_seed(0)
  model = models.get_model(name, input_shape, NUM_CLASSES)
  x = np.random.default_rng(0).normal(size=(3,) + input_shape)
  logits = model(x.astype(np.float32)).numpy()
  assert logits.shape == (3, NUM_CLASSES)
  assert np.all(np.isfinite(logits))
  assert model.layers[-1].activation is keras.activations.linear
  assert not model.optimizer  # uncompiled
  models.check_dp_compatible(model)
  assert {type(l).__name__ for l in model.layers} <= _ALLOWED


@pytest.mark.parametrize("name,input_shape", _CASES[:6])
def test_layer_names_are_deterministic(name, input_shape):
  first = models.get_model(name, input_shape, NUM_CLASSES)
  second = models.get_model(name, input_shape, NUM_CLASSES)
  assert [l.name for l in first.layers] == [l.name for l in second.layers]
  assert [w.name for w in first.weights] == [w.name for w in second.weights]


def test_tutorial_cnn_on_mnist_is_the_tf_privacy_tutorial():
  model = models.get_model("tutorial_cnn", (28, 28, 1), 10)
  shapes = {l.name: l.output_shape for l in model.layers}
  # 28 -conv s2 same-> 14 -pool 2/1-> 13 -conv 4 s2 valid-> 5 -pool-> 4.
  assert shapes["conv2"] == (None, 5, 5, 32)
  assert shapes["flatten"] == (None, 512)
  # conv1 8*8*16+16 = 1040, conv2 4*4*16*32+32 = 8224, dense1 512*32+32 =
  # 16416, logits 32*10+10 = 330: 26010 in all.
  assert model.count_params() == 26010
  assert model.get_layer("conv2").padding == "valid"


def test_tutorial_cnn_on_digits_pads_where_the_window_does_not_fit():
  model = models.get_model("tutorial_cnn", (8, 8, 1), 10)
  # 8 -conv s2-> 4 -pool-> 3: a 4x4 'valid' conv would not fit.
  assert model.get_layer("conv2").padding == "same"
  assert model.get_layer("pool2").output_shape == (None, 1, 1, 32)


def test_tempered_sigmoid_variants_and_activation():
  mnist = models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10)
  cifar = models.get_model("tempered_sigmoid_cnn", (32, 32, 3), 10)
  assert mnist.name.endswith("_mnist") and cifar.name.endswith("_cifar10")
  assert mnist.count_params() == 26010  # the tutorial CNN with tanh
  assert cifar.get_layer("dense1").units == 128
  assert all(l.activation.__name__ == "tanh" for l in mnist.layers
             if isinstance(l, keras.layers.Activation))
  with pytest.raises(ValueError, match="variant"):
    models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10, variant="vgg")


def test_tempered_sigmoid_layer_matches_tanh_and_sigmoid():
  x = tf.constant([-3.0, -0.5, 0.0, 0.7, 4.0])
  # 2 * sigmoid(2x) - 1 = tanh(x); 1 * sigmoid(1x) - 0 = sigmoid(x).
  np.testing.assert_allclose(tempered_lib.TemperedSigmoid(2, 2, 1)(x),
                             tf.tanh(x), atol=1e-6)
  np.testing.assert_allclose(tempered_lib.TemperedSigmoid(1, 1, 0)(x),
                             tf.sigmoid(x), atol=1e-6)
  model = models.get_model("tempered_sigmoid_cnn", (8, 8, 1), 10, scale=1.5,
                           inverse_temperature=1.0, offset=0.5)
  clone = keras.Model.from_config(model.get_config())
  assert isinstance(clone.get_layer("act1"), tempered_lib.TemperedSigmoid)
  assert clone.get_layer("act1").scale == 1.5


def test_wrn16_4_size_and_group_norm():
  model = models.get_model("wrn16_4", (32, 32, 3), 10)
  assert 2.7e6 < model.count_params() < 2.8e6  # WRN-16-4: 2.7M
  norms = [l for l in model.layers
           if isinstance(l, keras.layers.GroupNormalization)]
  assert norms
  for layer in norms:
    channels = layer.input_shape[-1]
    assert layer.groups <= 16 and channels % layer.groups == 0


def test_invalid_shapes_are_refused():
  with pytest.raises(ValueError, match="height, width, channels"):
    models.get_model("tutorial_cnn", (28, 28), 10)
  with pytest.raises(ValueError, match="depth"):
    models.get_model("wide_resnet", (8, 8, 1), 10, depth=12)
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("mlp", (4,), 1)


def _with_batch_norm(nested):
  inputs = keras.Input((4, 4, 1))
  h = keras.layers.Conv2D(2, 3, name="conv")(inputs)
  if nested:
    inner = keras.Sequential([keras.layers.BatchNormalization(name="bn")],
                             name="inner")
    h = inner(h)
  else:
    h = keras.layers.BatchNormalization(name="bn")(h)
  h = keras.layers.Flatten()(h)
  return keras.Model(inputs, keras.layers.Dense(3)(h), name="with_bn")


@pytest.mark.parametrize("nested", [False, True])
def test_batch_norm_is_refused_with_the_reason(nested):
  with pytest.raises(ValueError) as info:
    models.check_dp_compatible(_with_batch_norm(nested))
  message = str(info.value)
  assert "BatchNormalization" in message and "'bn'" in message
  assert "mix the examples of a batch" in message
  assert "per-example gradients" in message
  assert "GroupNormalization" in message


def test_tempered_sigmoid_cnn_group_norm_option_uses_dp_friendly_layers():
  import tfdpprune as tdp  # pylint: disable=g-import-not-at-top
  model = models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10,
                           norm="group", width=2)
  names = [l.name for l in model.layers]
  assert "gn_conv1" in names and "gn_conv2" in names
  assert tdp.validate(model) == []
  samplers = {s.split(":")[0] for _, _, s in tdp.pruning.report(
      tdp.prune(model))}
  assert samplers == {"conv2d", "normalization", "dense"}
  with pytest.raises(ValueError, match="norm"):
    models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10, norm="batch")


_SHAPES = {"wide_resnet": (8, 8, 3), "wrn16_4": (8, 8, 3),
           "resnet_small": (8, 8, 3)}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("name", models.available_models())
def test_every_model_takes_a_dp_step_on_both_kerases(name, version):
  import keras as keras3  # pylint: disable=g-import-not-at-top
  import tfdpprune as tdp  # pylint: disable=g-import-not-at-top
  module = keras3 if version == 3 else keras
  shape = _SHAPES.get(name, (8, 8, 1))
  model = models.get_model(name, shape, 4, keras=module)
  assert type(model).__module__.split(".")[0] == module.__name__
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                             expected_batch_size=4)
  private.compile(optimizer=module.optimizers.SGD(0.1),
                  loss=module.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  rng = np.random.default_rng(0)
  before = [v.numpy().copy() for v in model.trainable_variables]
  private.train_on_batch(rng.normal(size=(4,) + shape).astype("float32"),
                         np.arange(4))
  assert int(private.iterations.numpy()) == 1
  assert all(np.any(v.numpy() != b) for v, b in
             zip(model.trainable_variables, before))
  # Every weight has a dedicated (fast) sampler, in either Keras.
  assert not any(s.startswith(("generic", "NOT")) for _, _, s in
                 tdp.pruning.report(private.model))
