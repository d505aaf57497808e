"""The compat module: Keras 2 behind tfdpprune.keras, clear Keras 3 error."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_import_in_fresh_interpreter_exposes_tf_keras():
  proc = _python(
      "import tfdpprune, tf_keras, tensorflow as tf, sys\n"
      "assert tfdpprune.keras is tf_keras\n"
      "assert tf.keras.__name__.startswith('tf_keras')\n"
      "assert sys.skip_tf_privacy_import\n"
      "print('ok')")
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_keras3_already_loaded_gives_actionable_error():
  proc = _python("import tensorflow as tf\n"
                 "tf.keras.layers.Dense\n"   # loads Keras 3 as tf.keras
                 "import tfdpprune")
  assert proc.returncode != 0
  assert "ImportError" in proc.stderr
  assert "TF_USE_LEGACY_KERAS=1" in proc.stderr
  assert "import tfdpprune" in proc.stderr
