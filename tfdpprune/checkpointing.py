"""A run directory's checkpoints, kept so that every released step is in ε.

A run directory is released as a whole: each checkpoint holds an iterate and
each TensorBoard event a function of one, so every step whose state reached
the directory counts in epsilon, whatever happens to its files later. Hence:

* The checkpoints are found from the files themselves (`ckpt-N.index`), not
  only from TensorFlow's `checkpoint` state file, which a torn write can
  damage (`tf.train.latest_checkpoint` then says "none", and a naive trainer
  restarts at step 0 over the released files).
* A checkpoint is used only if every tensor reads back (TensorFlow checks
  each one's CRC) and its privacy ledger parses. A damaged newest checkpoint
  falls back to the newest readable one; the steps between the two were
  released (in the damaged files, in TensorBoard) and count as abandoned.
* The journal `privacy_journal.json` says how many steps that is. It is
  written, atomically, *before* every save: the step being checkpointed and
  the steps abandoned so far (divergence, lost checkpoints), under the run's
  ledger. A journal that cannot be read, checkpoints that all fail to read,
  a journal that counts checkpointed steps with no checkpoint left, or a
  damaged newest checkpoint without a journal: the run is refused
  (`ledger.ResumeRefused`), before anything is written.
* Checkpoint numbers are never reused (the next save is numbered above every
  `ckpt-N*` file found, damaged ones included, which stay as they were), and
  a save that fails (full disk, read-only directory) leaves no `ckpt-N_temp`
  directory behind and raises `RunDirectoryError`.
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Callable, List, Optional, Tuple

from absl import logging

from tfdpprune import ledger as ledger_lib
from tfdpprune._compat import tf

JOURNAL = "privacy_journal.json"
CHECKPOINTS = "checkpoints"
_STATE_FILE = "checkpoint"
_PREFIX = "ckpt"
_FILE = re.compile(rf"^{_PREFIX}-(\d+)(\.index|\.data-\d+-of-\d+|_temp.*)$")
_LEDGER_KEY = "ledger/params/.ATTRIBUTES/VARIABLE_VALUE"
_STEPS_KEY = "ledger/steps/.ATTRIBUTES/VARIABLE_VALUE"
_JOURNAL_VERSION = 1
# TensorFlow's errors when it reads or writes a file.
_IO_ERRORS = (OSError, tf.errors.OpError)


class RunDirectoryError(OSError):
  """The run directory cannot be written (full disk, no permission, ...)."""


@dataclasses.dataclass(frozen=True)
class Journal:
  """What the checkpoints alone cannot say about a run's released steps.

  Attributes:
    ledger: the run's privacy ledger (the abandoned steps were taken with it).
    checkpointed_step: the step of the last checkpoint save begun.
    abandoned_steps: steps taken and released that are not on the chain of
      the checkpoint resumed from (after divergence; past a damaged
      checkpoint); they count in epsilon.
  """
  ledger: ledger_lib.Ledger
  checkpointed_step: int = 0
  abandoned_steps: int = 0

  def to_json(self) -> str:
    return json.dumps({"version": _JOURNAL_VERSION,
                       "ledger": self.ledger.to_json(),
                       "checkpointed_step": self.checkpointed_step,
                       "abandoned_steps": self.abandoned_steps}, indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Journal":
    record = json.loads(text)
    if record.get("version") != _JOURNAL_VERSION:
      raise ValueError(f"journal version {record.get('version')!r} is not "
                       f"{_JOURNAL_VERSION}")
    journal = cls(ledger_lib.Ledger.from_json(record["ledger"]),
                  int(record["checkpointed_step"]),
                  int(record["abandoned_steps"]))
    if journal.checkpointed_step < 0 or journal.abandoned_steps < 0:
      raise ValueError("negative step counts")
    return journal


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a synced temporary file and a rename,
  so a crash leaves the old or the new content, never a torn file.

  Raises:
    RunDirectoryError: naming the file, if it cannot be written.
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise RunDirectoryError(
        f"cannot write {path}: {e.strerror or e}. Free disk space or fix "
        "the directory's permissions, then rerun the same command to "
        "resume") from e


def check_writable(directory: str) -> None:
  """Creates `directory` if needed and checks a file can be written there.

  Raises:
    RunDirectoryError: naming the directory and the reason.
  """
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise RunDirectoryError(f"cannot create the run directory {directory}: "
                            f"{e.strerror or e}") from e
  write_atomically(os.path.join(directory, ".write_check"), "ok")
  os.remove(os.path.join(directory, ".write_check"))


def is_run_directory(directory: str) -> bool:
  """Whether `directory` holds a run (a journal, checkpoints, or results
  with their config)."""
  return (os.path.isfile(os.path.join(directory, JOURNAL)) or
          os.path.isdir(os.path.join(directory, CHECKPOINTS)) or
          (os.path.isfile(os.path.join(directory, "results.json")) and
           os.path.isfile(os.path.join(directory, "config.json"))))


def run_directory_of(path: str) -> Optional[str]:
  """The run directory that `path` is in (or is), or None."""
  path = os.path.realpath(path)
  while True:
    if is_run_directory(path):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def _read_journal(workdir: str) -> Optional[Journal]:
  path = os.path.join(workdir, JOURNAL)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return Journal.from_json(f.read())
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ledger_lib.ResumeRefused(
        f"refusing to resume {workdir}: its privacy journal {path} cannot be "
        f"read ({type(e).__name__}: {e}), so the steps its run released "
        "cannot be counted. Restore the file from a backup, or start a new "
        "run in another --workdir.") from e


def _unreadable(prefix: str) -> Optional[str]:
  """Why checkpoint `prefix` cannot be restored, or None: every tensor is
  read (CRC-checked) and the ledger must parse."""
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_dtype_map():
      reader.get_tensor(name)
    if reader.has_tensor(_LEDGER_KEY):
      ledger_lib.Ledger.from_json(reader.get_tensor(_LEDGER_KEY).decode())
  except (tf.errors.OpError, ValueError, KeyError, TypeError,
          UnicodeDecodeError) as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return None


class RunCheckpoints:
  """The checkpoints and journal of one run directory.

  Construction only reads: it finds the newest restorable checkpoint and
  refuses (`ledger.ResumeRefused`) a directory that cannot be resumed without
  losing released steps from epsilon. `start` then restores and writes the
  journal; `save` (the interface of `tf.train.CheckpointManager` that the
  checkpoint callback uses) writes the journal, then the checkpoint.

  Attributes:
    resume_from: the checkpoint prefix to resume from, or None (fresh run).
    abandoned_steps: the journal's abandoned steps plus the steps lost with
      damaged checkpoints newer than `resume_from`.
    skipped: `[(prefix, why)]` of the damaged checkpoints passed over.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = workdir
    self.directory = os.path.join(workdir, CHECKPOINTS)
    self.max_to_keep = max_to_keep
    self.journal = _read_journal(workdir)
    numbers, complete = set(), set()
    for name in self._names():
      match = _FILE.match(name)
      if match:
        numbers.add(int(match.group(1)))
        if match.group(2) == ".index":
          complete.add(int(match.group(1)))
    self._last_number = max(numbers, default=0)
    self.skipped: List[Tuple[str, str]] = []
    self.resume_from, self._saved_ledger, step = None, None, 0
    for number in sorted(complete, reverse=True):
      prefix = os.path.join(self.directory, f"{_PREFIX}-{number}")
      why = _unreadable(prefix)
      if why is None:
        self.resume_from = prefix
        self._saved_ledger, step = self._ledger_and_step(prefix)
        break
      self.skipped.append((prefix, why))
    self._check_resumable(step)
    lost = 0
    if self.journal is not None:
      lost = max(0, self.journal.checkpointed_step - step)
    self.start_step = step
    self.abandoned_steps = lost + (
        self.journal.abandoned_steps if self.journal else 0)
    self._manager = self._checkpoint = self._steps = None

  def _names(self) -> List[str]:
    return (os.listdir(self.directory) if os.path.isdir(self.directory)
            else [])

  def _ledger_and_step(self, prefix):
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(_LEDGER_KEY):
      raise ledger_lib.LedgerMismatch(
          f"refusing to resume {self.workdir}: its checkpoint {prefix} has no "
          "privacy ledger (it was written by an older tfdpprune), so the "
          "privacy parameters of its steps cannot be checked. Start a new "
          "run in another --workdir.")
    return (ledger_lib.Ledger.from_json(
        reader.get_tensor(_LEDGER_KEY).decode()),
            int(reader.get_tensor(_STEPS_KEY)))

  def _check_resumable(self, step):
    damaged = "".join(f"\n  {p}: {why}" for p, why in self.skipped)
    fix = ("Restore the files from a backup, or start a new run in another "
           "--workdir; this one is left as it is.")
    if self.skipped and self.resume_from is None:
      raise ledger_lib.ResumeRefused(
          f"refusing to resume {self.workdir}: none of its checkpoints can "
          f"be read, so training on would write over released steps that "
          f"epsilon could no longer count. Damaged:{damaged}\n{fix}")
    if self.skipped and self.journal is None:
      raise ledger_lib.ResumeRefused(
          f"refusing to resume {self.workdir}: its newest checkpoints are "
          f"damaged and it has no privacy journal ({JOURNAL}), so the steps "
          f"they held cannot be counted. Damaged:{damaged}\n{fix}")
    if (self.journal is not None and self.resume_from is None and
        self.journal.checkpointed_step > 0):
      raise ledger_lib.ResumeRefused(
          f"refusing to resume {self.workdir}: its privacy journal counts "
          f"{self.journal.checkpointed_step} checkpointed steps but no "
          f"checkpoint is left in {self.directory}. {fix}")
    if self.skipped:
      logging.warning(
          "%s: resuming from %s (step %d), the newest readable checkpoint; "
          "the steps after it count as abandoned in epsilon. Damaged, left "
          "as they were:%s", self.workdir, self.resume_from, step, damaged)

  @property
  def earlier_ledgers(self) -> List[ledger_lib.Ledger]:
    """The ledgers of the run's earlier segments (checkpoint, journal)."""
    return [l for l in (self._saved_ledger,
                        self.journal.ledger if self.journal else None) if l]

  def start(self, checkpoint: tf.train.Checkpoint, steps: tf.Variable,
            ledger: ledger_lib.Ledger,
            mismatch: Callable[[], str] = lambda: "") -> int:
    """Restores `resume_from` into `checkpoint` and writes the journal.

    `steps` is the step counter saved in `checkpoint` (the optimizer's
    iterations). Returns the step resumed from (0 for a fresh run).

    Raises:
      ledger.ResumeRefused: the checkpoint holds other objects than
        `checkpoint` (another model, pruning or weight averaging);
        `mismatch()` says which settings changed.
      RunDirectoryError: the journal cannot be written.
    """
    for name in self._names():
      if name.startswith(f"{_PREFIX}-") and "_temp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    if self.resume_from is not None:
      status = checkpoint.restore(self.resume_from).expect_partial()
      try:
        # Every existing object is restored; optimizer variables created
        # later (hyper-parameters, slots) are restored when created.
        status.assert_existing_objects_matched()
      except AssertionError as e:
        raise ledger_lib.ResumeRefused(
            f"refusing to resume {self.workdir}: its checkpoint "
            f"{self.resume_from} holds another model, pruning or weight "
            f"averaging than this run builds ({str(e).splitlines()[0][:300]})."
            f"{mismatch()} Rerun with the checkpoint's flags, or start a new "
            "run in another --workdir.") from e
      self._write_state_file()
    checkpoint.save_counter.assign(self._last_number)
    self._checkpoint, self._steps = checkpoint, steps
    self._manager = tf.train.CheckpointManager(
        checkpoint, self.directory, max_to_keep=self.max_to_keep,
        checkpoint_name=_PREFIX)
    self.journal = Journal(ledger, self.start_step, self.abandoned_steps)
    self._write_journal()
    return self.start_step

  def _write_state_file(self):
    """Points TensorFlow's state file at the checkpoint resumed from (a
    damaged state file is replaced; a valid one is kept)."""
    state = tf.train.get_checkpoint_state(self.directory)
    if state is not None and state.model_checkpoint_path == self.resume_from:
      return
    name = os.path.basename(self.resume_from)
    write_atomically(os.path.join(self.directory, _STATE_FILE),
                     f'model_checkpoint_path: "{name}"\n'
                     f'all_model_checkpoint_paths: "{name}"\n')

  def _write_journal(self):
    write_atomically(os.path.join(self.workdir, JOURNAL),
                     self.journal.to_json())

  @property
  def latest_checkpoint(self) -> Optional[str]:
    return self._manager.latest_checkpoint if self._manager else (
        self.resume_from)

  def save(self) -> str:
    """Journals the current step, then saves a checkpoint numbered above
    every one found.

    Raises:
      RunDirectoryError: the checkpoint or journal cannot be written; no
        `_temp` directory is left.
    """
    previous = self.journal
    self.journal = dataclasses.replace(
        previous, checkpointed_step=int(self._steps.numpy()))
    self._write_journal()
    number = int(self._checkpoint.save_counter.numpy()) + 1
    try:
      return self._manager.save()
    except _IO_ERRORS as e:
      partial = False
      for name in self._names():
        if name.startswith(f"{_PREFIX}-{number}_temp"):
          shutil.rmtree(os.path.join(self.directory, name),
                        ignore_errors=True)
        elif name.startswith(f"{_PREFIX}-{number}."):
          partial = True  # on disk, so released: it stays journaled
      if not partial:
        self.journal = previous
        try:
          self._write_journal()
        except RunDirectoryError:
          pass  # the journal over-counts: conservative
      message = getattr(e, "message", None) or str(e)
      message = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "",
                       message.splitlines()[0])[:300]
      raise RunDirectoryError(
          f"cannot write checkpoint {number} to {self.directory}: {message}. "
          "Free disk space or fix the directory's permissions, then rerun "
          "the same command to resume from "
          f"{self.latest_checkpoint or 'the start'}") from e

  def record_abandoned(self, steps: int) -> None:
    """Counts `steps` more abandoned steps (taken, not checkpointed)."""
    self.journal = dataclasses.replace(
        self.journal, abandoned_steps=self.journal.abandoned_steps + steps)
    self._write_journal()
