"""A run directory's checkpoints: damage never restarts, overwrites or drops a
released step from epsilon (`tfdpprune.checkpointing`)."""

import glob
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from tfdpprune import accounting
from tfdpprune import checkpointing
from tfdpprune import experiment
from tfdpprune import ledger
from tfdpprune.config import PruneConfig
from tfdpprune.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits: N = 1437, B = 128 -> 11 steps per epoch; checkpoints at 11, 22, 33.
CONFIG = TrainConfig(steps=33, noise_multiplier=1.0)


def _cli(*args, preexec_fn=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "tfdpprune.train", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, preexec_fn=preexec_fn)


def _snapshot(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for directory, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def _checkpoint_files(workdir):
  return {k: v for k, v in _snapshot(workdir).items()
          if k.startswith("checkpoints/ckpt-")}


def _numbers(workdir):
  return sorted({int(os.path.basename(p).split("-")[1].split(".")[0])
                 for p in glob.glob(os.path.join(workdir, "checkpoints",
                                                 "ckpt-*.index"))})


def _damage(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xde\xad\xbe\xef" * 8)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 33-step run's directory and results (copied per test)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  return workdir, experiment.run(CONFIG, workdir, verbose=0)


def _copy(finished, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  return workdir


def test_damaged_state_file_neither_restarts_nor_overwrites(finished,
                                                            tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _checkpoint_files(workdir)
  with open(os.path.join(workdir, "checkpoints", "checkpoint"), "w") as f:
    f.write("garbage \x00\x01 torn write")
  results = experiment.run(CONFIG, workdir, verbose=0)
  assert results["resumed_from_step"] == 33 and results["steps"] == 33
  assert results["abandoned_steps"] == 0
  assert results["epsilon"] == finished[1]["epsilon"]
  after = _checkpoint_files(workdir)
  assert {k: after[k] for k in before} == before  # nothing overwritten


def test_damaged_newest_checkpoint_falls_back_and_counts_its_steps(
    finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  assert _numbers(workdir) == [2, 3]  # steps 22 and 33
  newest = glob.glob(os.path.join(workdir, "checkpoints", "ckpt-3.data-*"))[0]
  _damage(newest)
  damaged = _checkpoint_files(workdir)
  results = experiment.run(CONFIG, workdir, verbose=0)
  # Resumed at step 22 (ckpt-2); steps 23..33 of the first run were released
  # (the damaged ckpt-3, TensorBoard) and count: 33 + 11 steps in epsilon.
  assert results["resumed_from_step"] == 22 and results["steps"] == 33
  assert results["abandoned_steps"] == 11
  assert results["epsilon"] == pytest.approx(accounting.compute_epsilon(
      1437, 128, 1.0, steps=44))
  after = _checkpoint_files(workdir)
  for name in damaged:
    if "ckpt-3" in name:
      assert after[name] == damaged[name]  # left as it was, never reused
  assert max(_numbers(workdir)) == 4
  with open(os.path.join(workdir, checkpointing.JOURNAL)) as f:
    journal = json.load(f)
  assert journal["abandoned_steps"] == 11
  assert journal["checkpointed_step"] == 33
  # Resuming again counts them once, not twice.
  again = experiment.run(CONFIG, workdir, verbose=0)
  assert again["abandoned_steps"] == 11


def _refused(workdir, match):
  before = _snapshot(workdir)
  with pytest.raises(ledger.ResumeRefused, match=match):
    experiment.run(CONFIG, workdir, verbose=0)
  assert _snapshot(workdir) == before  # not trained over, not touched


def test_every_unrecoverable_directory_is_refused_untouched(finished,
                                                            tmp_path):
  # Every checkpoint damaged.
  workdir = _copy(finished, tmp_path / "all")
  for path in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")):
    _damage(path)
  _refused(workdir, "none of its checkpoints can be read")
  # A damaged journal.
  workdir = _copy(finished, tmp_path / "journal")
  with open(os.path.join(workdir, checkpointing.JOURNAL), "w") as f:
    f.write("{not json")
  _refused(workdir, "privacy journal .* cannot be read")
  # Checkpoints gone while the journal counts steps.
  workdir = _copy(finished, tmp_path / "gone")
  for path in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*")):
    os.remove(path)
  _refused(workdir, "counts 33 checkpointed steps but no checkpoint")
  # The newest damaged and no journal to count its steps.
  workdir = _copy(finished, tmp_path / "nojournal")
  os.remove(os.path.join(workdir, checkpointing.JOURNAL))
  _damage(glob.glob(os.path.join(workdir, "checkpoints", "ckpt-3.index"))[0])
  _refused(workdir, "no privacy journal")


def test_cli_damage_is_a_clear_error_not_a_traceback(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.data*")):
    _damage(path)
  proc = _cli("--steps=33", "--noise_multiplier=1.0", "--verbose=0",
              f"--workdir={workdir}")
  assert proc.returncode == 2
  assert "Error: refusing to resume" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("change,name", [
    (dict(prune=PruneConfig(mode="freeze", sparsity=0.5)), "prune.mode"),
    (dict(ema_decay=0.9), "ema_decay")])
def test_resume_with_other_model_state_is_refused_naming_it(
    finished, tmp_path, change, name):
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  config = TrainConfig(**{**CONFIG.to_dict(), **change})
  with pytest.raises(ledger.ResumeRefused, match=name):
    experiment.run(config, workdir, verbose=0)
  assert _snapshot(workdir) == before


def _no_large_files():
  """In the child: files above 64 KiB cannot be written (a full disk for
  the 157 KB checkpoints, not for the small JSON files)."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_full_disk_is_a_clear_error_and_leaves_no_temp_dir(tmp_path):
  workdir = str(tmp_path / "run")
  args = ("--steps=22", "--noise_multiplier=1.0", "--verbose=0",
          f"--workdir={workdir}")
  proc = _cli(*args, preexec_fn=_no_large_files)
  assert proc.returncode == 1
  assert "Error: cannot write checkpoint 1" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*_temp*"))
  # With space again, the same command runs (nothing of the failed save was
  # released, so nothing is counted twice).
  assert _cli(*args).returncode == 0
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["steps"] == 22 and results["abandoned_steps"] == 0


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = _cli("--steps=2", "--verbose=0", f"--workdir={blocker / 'run'}")
  assert proc.returncode == 1
  assert "Error: cannot create the run directory" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_failed_save_raises_run_directory_error(tmp_path, monkeypatch):
  from tfdpprune._compat import tf  # pylint: disable=g-import-not-at-top

  def refuse(self, *args, **kwargs):
    del self, args, kwargs
    raise tf.errors.PermissionDeniedError(None, None,
                                          "Read-only file system")
  monkeypatch.setattr(tf.train.CheckpointManager, "save", refuse)
  with pytest.raises(checkpointing.RunDirectoryError,
                     match="Read-only file system"):
    experiment.run(TrainConfig(steps=11, noise_multiplier=1.0),
                   str(tmp_path / "run"), verbose=0)


def test_run_directory_of_finds_the_enclosing_run(finished, tmp_path):
  workdir = finished[0]
  assert checkpointing.run_directory_of(
      os.path.join(workdir, "cache", "deeper")) == os.path.realpath(workdir)
  assert checkpointing.run_directory_of(str(tmp_path)) is None
