"""Wide ResNets with GroupNorm (no BatchNorm), for DP-SGD.

Pre-activation WRN-d-k (Zagoruyko & Komodakis 2016): a 3x3 stem conv with
16 channels, three stages of `(d - 4) / 6` blocks with widths 16k, 32k, 64k
(strides 1, 2, 2), then norm -> relu -> global average pool -> Dense logits.
BatchNorm is replaced by GroupNormalization (as in De et al. 2022, "Unlocking
High-Accuracy Differentially Private Image Classification through Scale"),
whose statistics are per example, so per-example gradients stay defined.
Only Conv2D, Dense, GroupNormalization, Activation, Add and pooling layers
are used, so the pruning wrappers cover every weight.
"""

from tfdpprune.models import _common


def _groups_for(channels: int, max_groups: int) -> int:
  """The largest divisor of `channels` that is at most `max_groups`."""
  return max(g for g in range(1, min(channels, max_groups) + 1)
             if channels % g == 0)


def _norm_act(keras, x, groups, name):
  channels = int(x.shape[-1])
  x = keras.layers.GroupNormalization(
      groups=_groups_for(channels, groups), name=f"{name}_gn")(x)
  return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _block(keras, x, filters, stride, groups, name):
  """Pre-activation basic block; 1x1 projection when the shape changes."""
  pre = _norm_act(keras, x, groups, f"{name}_pre")
  if stride != 1 or int(x.shape[-1]) != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                   name=f"{name}_proj")(pre)
  else:
    shortcut = x
  h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                          use_bias=False, name=f"{name}_conv1")(pre)
  h = _norm_act(keras, h, groups, f"{name}_mid")
  h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"{name}_conv2")(h)
  return keras.layers.Add(name=f"{name}_add")([shortcut, h])


def wide_resnet(input_shape, num_classes: int, *, depth: int = 16,
                width: int = 4, groups: int = 16,
                name: str = None, keras=None):
  """A pre-activation WRN-`depth`-`width` with GroupNorm.

  Args:
    input_shape: `(H, W, C)`.
    num_classes: number of logits.
    depth: 6n + 4 (n blocks per stage), e.g. 10, 16, 28.
    width: channel multiplier k.
    groups: GroupNorm groups, reduced to the largest divisor of a layer's
      channels that does not exceed it.
    name: model name; default "wrn<depth>_<width>".
    keras: the Keras module to build with (default `tf_keras`).

  Returns:
    An uncompiled functional `keras.Model` producing logits.

  Example:
    >>> wide_resnet((32, 32, 3), 10, depth=16, width=4).name
    'wrn16_4'
  """
  keras = _common.keras_module(keras)
  _common.check_num_classes(num_classes)
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
  if width < 1 or groups < 1:
    raise ValueError(f"width and groups must be >= 1, got {width}, {groups}")
  blocks = (depth - 4) // 6
  inputs = _common.image_input(input_shape, keras=keras)
  h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
                          name="stem_conv")(inputs)
  for stage, (filters, stride) in enumerate(
      ((16 * width, 1), (32 * width, 2), (64 * width, 2)), start=1):
    for b in range(1, blocks + 1):
      h = _block(keras, h, filters, stride if b == 1 else 1, groups,
                 f"stage{stage}_block{b}")
  h = _norm_act(keras, h, groups, "final")
  h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
  logits = keras.layers.Dense(num_classes, name="logits")(h)
  return keras.Model(inputs, logits, name=name or f"wrn{depth}_{width}")


def wrn16_4(input_shape, num_classes: int, *, groups: int = 16, keras=None):
  """WRN-16-4 (2.7M parameters on CIFAR-10) with GroupNorm."""
  return wide_resnet(input_shape, num_classes, depth=16, width=4,
                     groups=groups, name="wrn16_4", keras=keras)


def resnet_small(input_shape, num_classes: int, *, groups: int = 16,
                 keras=None):
  """WRN-10-1: 3 stages x 1 block, 16/32/64 channels (~78k parameters)."""
  return wide_resnet(input_shape, num_classes, depth=10, width=1,
                     groups=groups, name="resnet_small", keras=keras)
