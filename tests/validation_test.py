"""tdp.validate: every problem of a model at once, with the fix."""

import pytest

import tfdpprune as tdp

keras = tdp.keras


def test_lists_every_problem_at_once():
  inputs = keras.Input((6, 6, 1))
  h = keras.layers.Conv2D(2, 3, kernel_regularizer="l2", name="conv")(inputs)
  h = keras.layers.BatchNormalization(name="bn")(h)
  inner = keras.Sequential([keras.layers.BatchNormalization(name="inner_bn")],
                           name="inner")
  h = inner(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(4, activity_regularizer="l1", name="dense")(h)
  model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
  problems = tdp.validate(model)
  found = {(p.layer, p.layer_class) for p in problems}
  assert found == {("conv", "Conv2D"), ("bn", "BatchNormalization"),
                   ("inner_bn", "BatchNormalization"), ("dense", "Dense")}
  for p in problems:
    assert "Fix:" in str(p)
  with pytest.raises(ValueError) as e:
    tdp.validate(model, strict=True)
  message = str(e.value)
  for name in ("'conv'", "'bn'", "'inner_bn'", "'dense'", "GroupNormalization",
               "4 problems"):
    assert name in message


def test_clean_and_frozen_batch_norm_models_pass():
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.LayerNormalization(),
                            keras.layers.Dense(2)])
  assert tdp.validate(model) == []
  frozen = keras.layers.BatchNormalization()
  frozen.trainable = False  # inference mode: moving statistics, per example
  model = keras.Sequential([keras.Input((4,)), frozen, keras.layers.Dense(2)])
  assert tdp.validate(model) == []


def test_normalizing_over_the_batch_axis_is_a_problem():
  layer = keras.layers.LayerNormalization(axis=[0, 1])  # a layer is checked
  (problem,) = tdp.validate(layer)                       # like a model
  assert "batch axis" in problem.reason
