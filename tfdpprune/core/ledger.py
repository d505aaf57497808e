"""The privacy ledger of a run: what its epsilon depends on, checked on resume.

Epsilon is computed from the steps really taken with the parameters really
used. A checkpoint therefore carries a `Ledger` — sigma, q, N, C, delta, the
accountant, a fingerprint of the private data, whether the noise and sampling
were secret, and the privacy-relevant flags — next to the optimizer's step
count. Resuming with anything different is refused (`LedgerMismatch`, naming
each change with both values): accounting the earlier steps at the new
parameters would misreport epsilon.

The data fingerprint is an HMAC-SHA256 of a per-run salt and the private
arrays under a key kept outside every run directory (`fingerprint_key`): a
plain hash of the private data in a released checkpoint would let an
adversary who knows all but one example test membership by hashing both
candidate data sets, and without the salt two runs' fingerprints would tell
whether their data were identical. It is kept in checkpoints only (not in
results.json).
"""

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from typing import Dict, List, Optional, Tuple

import numpy as np

from tfdpprune.core._tf import tf

KEY_FILE_ENV = "TFDPPRUNE_FINGERPRINT_KEY_FILE"
_KEY_BYTES = 32
_VERSION = 1


class ResumeRefused(ValueError):
  """A run directory that cannot be resumed without misreporting epsilon or
  writing over released files; refused before anything is written (the
  trainer exits with code 2)."""


class LedgerMismatch(ResumeRefused):
  """A resume whose privacy parameters or data differ from the checkpoint's."""


def default_key_file() -> str:
  """`$TFDPPRUNE_FINGERPRINT_KEY_FILE`, else the user's config directory."""
  if os.environ.get(KEY_FILE_ENV):
    return os.environ[KEY_FILE_ENV]
  config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
      os.path.expanduser("~"), ".config")
  return os.path.join(config, "tfdpprune", "fingerprint.key")


def fingerprint_key(path: Optional[str] = None) -> bytes:
  """The user's fingerprint key (32 random bytes, created once, mode 0600).

  It lives outside run directories, so released files never contain it.
  Created atomically (write a temporary file, then hard-link it into place),
  so concurrent first runs agree on one key.
  """
  path = path or default_key_file()
  if not os.path.exists(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(_KEY_BYTES))
      try:
        os.link(tmp, path)
      except FileExistsError:
        pass  # another process won the race; use its key
    finally:
      os.unlink(tmp)
  with open(path, "rb") as f:
    key = f.read()
  if len(key) != _KEY_BYTES:
    raise ValueError(f"fingerprint key file {path!r} holds {len(key)} bytes, "
                     f"expected {_KEY_BYTES}; delete it to make a new key")
  return key


def new_salt() -> str:
  """A fresh per-run salt (hex), so that runs on the same data have
  unrelated fingerprints."""
  return secrets.token_hex(16)


def fingerprint(*arrays: np.ndarray, key: Optional[bytes] = None,
                salt: str = "") -> str:
  """A keyed fingerprint (HMAC-SHA256, hex) of a salt and arrays' shapes,
  dtypes and bytes."""
  mac = hmac.new(key if key is not None else fingerprint_key(),
                 digestmod=hashlib.sha256)
  mac.update(salt.encode())
  for a in arrays:
    a = np.ascontiguousarray(a)
    mac.update(f"{a.dtype.str}{a.shape}".encode())
    mac.update(memoryview(a).cast("B"))
  return mac.hexdigest()


@dataclasses.dataclass(frozen=True)
class Ledger:
  """What a run's epsilon depends on (besides its step count).

  Attributes:
    noise_multiplier: sigma.
    sampling_probability: q = B / N.
    num_examples: N.
    l2_norm_clip: C.
    delta: the delta of the reported epsilon.
    accountant: "rdp" or "pld".
    data_fingerprint: `fingerprint` of the private training data, under
      the user's key and this run's salt.
    private_randomness: whether noise and sampling keys were secret.
    flags: the privacy-relevant flags, `((name, value), ...)` sorted.
    fingerprint_salt: the run's salt of `data_fingerprint`.
  """
  noise_multiplier: float
  sampling_probability: float
  num_examples: int
  l2_norm_clip: float
  delta: float
  accountant: str
  data_fingerprint: str
  private_randomness: bool
  flags: Tuple[Tuple[str, object], ...] = ()
  fingerprint_salt: str = ""

  def __post_init__(self):
    object.__setattr__(self, "flags", tuple(sorted(
        (str(k), v) for k, v in dict(self.flags).items())))

  def to_dict(self) -> Dict[str, object]:
    out = dataclasses.asdict(self)
    out["flags"] = dict(self.flags)
    out["version"] = _VERSION
    return out

  def public_dict(self) -> Dict[str, object]:
    """`to_dict` without the data fingerprint and its salt (for results)."""
    out = self.to_dict()
    del out["data_fingerprint"], out["fingerprint_salt"]
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Ledger":
    d = json.loads(text)
    version = d.pop("version", None)
    if version != _VERSION:
      raise ValueError(f"privacy ledger version {version!r} is not "
                       f"{_VERSION}")
    return cls(**d)

  def changes(self, now: "Ledger") -> List[str]:
    """Human-readable differences, `self` being the checkpoint's."""
    out = []
    old_flags, new_flags = dict(self.flags), dict(now.flags)
    for name in sorted(set(old_flags) | set(new_flags)):
      a, b = old_flags.get(name), new_flags.get(name)
      if a != b:
        out.append(f"--{name}: {a!r} in the checkpoint, {b!r} now")
    derived = (("noise_multiplier", "noise multiplier sigma"),
               ("sampling_probability", "sampling probability q"),
               ("num_examples", "private examples N"),
               ("l2_norm_clip", "clip norm C"), ("delta", "delta"),
               ("accountant", "accountant"),
               ("private_randomness", "secret noise and sampling"))
    for field, label in derived:
      a, b = getattr(self, field), getattr(now, field)
      if a != b and f"--{field}:" not in " ".join(out):
        out.append(f"{label}: {a!r} in the checkpoint, {b!r} now")
    if self.data_fingerprint != now.data_fingerprint:
      out.append("the private training data differ (fingerprint "
                 f"{self.data_fingerprint[:12]}… in the checkpoint, "
                 f"{now.data_fingerprint[:12]}… now)")
    return out


class LedgerState(tf.Module):
  """The ledger as checkpoint state: its JSON and the optimizer's steps.

  `steps` is the optimizer's `iterations` variable itself, so the ledger and
  the step count are saved and restored together.
  """

  def __init__(self, ledger: Ledger, steps: tf.Variable):
    super().__init__(name="privacy_ledger")
    self.params = tf.Variable(ledger.to_json(), trainable=False,
                              name="params")
    self.steps = steps

  @property
  def ledger(self) -> Ledger:
    return Ledger.from_json(self.params.numpy().decode())


def check_resume(saved: Ledger, now: Ledger, where: str = "") -> None:
  """Raises `LedgerMismatch` listing every change, if there is any."""
  changes = saved.changes(now)
  if changes:
    raise LedgerMismatch(
        f"refusing to resume {where or 'this run'}: its checkpoint was "
        "trained with other privacy parameters or data, and accounting its "
        "steps with the new ones would misreport epsilon. Changed:\n" +
        "\n".join(f"  {c}" for c in changes) +
        "\nRerun with the checkpoint's flags to resume, or start a new run "
        "in another --workdir.")
