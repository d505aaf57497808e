"""The core is backend-neutral: TensorFlow and dp_accounting, never Keras."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "tfdpprune", "core")
# What a core module may import from tfdpprune outside the core.
_ALLOWED = {"tfdpprune.config"}


def _imports(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_core_modules_import_no_keras_and_no_front_end():
  checked = 0
  for directory, _, files in os.walk(CORE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      checked += 1
      for module in _imports(path):
        root = module.split(".")[0]
        assert root not in ("keras", "tf_keras", "tensorflow_model_optimization"
                            ), (path, module)
        if root == "tfdpprune" and not module.startswith("tfdpprune.core"):
          assert any(module == a or module.startswith(a + ".")
                     for a in _ALLOWED), (path, module)
  assert checked >= 15
