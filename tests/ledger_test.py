"""The privacy ledger: keyed data fingerprints, changes named, JSON round trip."""

import os
import stat

import numpy as np
import pytest

from tfdpprune import ledger


def _ledger(**kw):
  base = dict(noise_multiplier=1.1, sampling_probability=0.01,
              num_examples=1000, l2_norm_clip=1.0, delta=1e-5,
              accountant="rdp", data_fingerprint="ab" * 32,
              private_randomness=True,
              flags=(("epochs", 10.0), ("batch_size", 10)))
  base.update(kw)
  return ledger.Ledger(**base)


def test_json_round_trip():
  a = _ledger()
  assert ledger.Ledger.from_json(a.to_json()) == a
  assert a.to_dict()["flags"] == {"batch_size": 10, "epochs": 10.0}


def test_changes_name_each_flag_with_both_values():
  saved = _ledger()
  now = _ledger(noise_multiplier=1.3, flags=(("epochs", 20.0),
                                             ("batch_size", 10)),
                data_fingerprint="cd" * 32)
  changes = saved.changes(now)
  text = "\n".join(changes)
  assert "--epochs: 10.0 in the checkpoint, 20.0 now" in text
  assert "noise multiplier sigma: 1.1 in the checkpoint, 1.3 now" in text
  assert "private training data differ" in text
  assert len(changes) == 3
  assert saved.changes(_ledger()) == []
  with pytest.raises(ledger.LedgerMismatch, match="--epochs"):
    ledger.check_resume(saved, now, "runs/x")
  ledger.check_resume(saved, _ledger())  # no change: no error


def test_fingerprint_is_keyed_and_sensitive_to_one_example(tmp_path):
  key_a = ledger.fingerprint_key(str(tmp_path / "a.key"))
  key_b = ledger.fingerprint_key(str(tmp_path / "b.key"))
  assert key_a != key_b and len(key_a) == 32
  assert ledger.fingerprint_key(str(tmp_path / "a.key")) == key_a  # reused
  mode = stat.S_IMODE(os.stat(tmp_path / "a.key").st_mode)
  assert mode == 0o600
  x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
  y = np.arange(50, dtype=np.int32)
  f = ledger.fingerprint(x, y, key=key_a)
  assert f == ledger.fingerprint(x.copy(), y.copy(), key=key_a)
  assert f != ledger.fingerprint(x[:-1], y[:-1], key=key_a)  # one removed
  x2 = x.copy()
  x2[7, 2] += 1e-3
  assert f != ledger.fingerprint(x2, y, key=key_a)
  # Without the key, the fingerprint is unrelated to the data's plain hash
  # and to the fingerprint under another key.
  assert f != ledger.fingerprint(x, y, key=key_b)


def test_default_key_file_follows_the_environment(tmp_path, monkeypatch):
  path = str(tmp_path / "k" / "fp.key")
  monkeypatch.setenv(ledger.KEY_FILE_ENV, path)
  assert ledger.default_key_file() == path
  key = ledger.fingerprint_key()
  assert os.path.exists(path) and len(key) == 32
