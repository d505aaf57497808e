"""The package: `pip install` works and `import tfdpprune` from anywhere."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_wheel(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  shutil.copytree(os.path.join(ROOT, "tfdpprune"), source / "tfdpprune",
                  ignore=shutil.ignore_patterns("__pycache__"))
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", str(source), "-w", str(wheels)],
                 check=True, capture_output=True, text=True, timeout=300)
  (wheel,) = wheels.glob("tfdpprune-*.whl")
  return wheel


def test_wheel_holds_every_module_and_the_console_script(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = next(z.read(n).decode() for n in names
                        if n.endswith("entry_points.txt"))
  for module in ("tfdpprune/__init__.py", "tfdpprune/train.py",
                 "tfdpprune/models/__init__.py", "tfdpprune/models/mlp.py"):
    assert module in names
  source_modules = {f"tfdpprune/{f}" for f in os.listdir(
      os.path.join(ROOT, "tfdpprune")) if f.endswith(".py")}
  assert source_modules <= names
  assert "tfdpprune-train = tfdpprune.train:console_main" in entry_points


def test_installed_package_imports_from_another_directory(tmp_path):
  wheel = _build_wheel(tmp_path)
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--target", str(site), str(wheel)], check=True,
                 capture_output=True, text=True, timeout=300)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-c", "import tfdpprune; print(tfdpprune.__file__, "
       "tfdpprune.MaskedDPKerasAdamOptimizer.__name__)"], cwd=elsewhere,
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(str(site))
  script = site / "bin" / "tfdpprune-train"
  proc = subprocess.run([sys.executable, str(script), "--steps=2",
                         "--verbose=0", f"--workdir={tmp_path / 'run'}"],
                        cwd=elsewhere, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "test accuracy" in proc.stdout
