"""Importing tfdpprune changes nothing global, whatever was imported first."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env_overrides):
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **env_overrides)
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


# Each order trains one Keras 3 private step and one Keras 2 optimizer step.
_TRAIN_BOTH = """
import numpy as np
x = np.random.rand(8, 3).astype("float32"); y = np.arange(8) % 2
m3 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
p3 = tdp.make_private(m3, l2_norm_clip=1.0, noise_multiplier=0.0,
                      expected_batch_size=8)
p3.compile(optimizer=keras.optimizers.SGD(0.1),
           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
p3.train_on_batch(x, y)
k2 = tdp.keras
m2 = tdp.prune(k2.Sequential([k2.Input((3,)), k2.layers.Dense(2)]))
m2.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 0.0, expected_batch_size=8),
           k2.losses.SparseCategoricalCrossentropy(
               from_logits=True, reduction="none"))
m2.train_on_batch(x, y)
assert int(p3.iterations.numpy()) == 1
assert int(m2.optimizer.iterations.numpy()) == 1
print("ok", tf.keras.__name__ if hasattr(tf.keras, "__name__") else "")
"""


@pytest.mark.parametrize("first", [
    "import keras\nimport tfdpprune as tdp\nimport tensorflow as tf",
    "import tfdpprune as tdp\nimport keras\nimport tensorflow as tf",
    "import tensorflow as tf\ntf.keras.layers.Dense\nimport keras\n"
    "import tfdpprune as tdp",
])
def test_any_import_order_trains_both_kerases(first):
  proc = _python(first + "\n" + _TRAIN_BOTH)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok" in proc.stdout


def test_import_leaves_tf_keras_and_the_environment_alone():
  proc = _python(
      "import os, tf_keras\n"
      "before = dict(os.environ)\n"
      "import tfdpprune, tensorflow as tf\n"
      "assert tfdpprune.keras is tf_keras\n"
      "assert 'TF_USE_LEGACY_KERAS' not in os.environ\n"
      "assert {k: v for k, v in os.environ.items() if k in before} == "
      "before\n"
      "assert not tf.keras.__name__.startswith('tf_keras'), tf.keras\n"
      "print('ok')")
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_users_legacy_keras_setting_is_kept():
  proc = _python("import tfdpprune, tensorflow as tf\n"
                 "assert tf.keras.__name__.startswith('tf_keras')\n"
                 "print('ok')", TF_USE_LEGACY_KERAS="1")
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
