r"""Start N local workers of one `tfdpprune.train` run (MultiWorkerMirroredStrategy).

  python -m launch.multiworker --num_workers=2 --workdir=runs/mw -- \
      --steps=20 --noise_multiplier=1.0 --verbose=0

Each worker is `python -m tfdpprune.train <flags after --> --workdir=...
--distribute=multi_worker` with a `TF_CONFIG` naming all workers on free local
ports and its own index. Worker 0 (the chief) writes `results.json`,
TensorBoard and checkpoints to `--workdir`; the others write under
`<workdir>/workers/worker_<i>`. Logs go to `<workdir>/worker_<i>.log`. The
launcher waits for all workers, forwards SIGINT/SIGTERM to them, and exits
non-zero if any worker fails.

Privacy: each step's global Poisson batch is split across the workers (each
samples its own partition of the private data with rate q, so the union is
exactly a Poisson sample of the whole set), every example is clipped on the
worker that holds it, and Gaussian noise is added once to the global sum (by
replica 0). The reported epsilon is therefore the single-replica epsilon for
the same flags. Each worker draws its own secret keys from OS entropy.
"""

import json
import os
import signal
import subprocess
import sys
from typing import List, Sequence

from absl import app
from absl import flags
from absl import logging

from launch.cluster import free_ports
from launch.cluster import tf_configs

flags.DEFINE_integer("num_workers", 2, "Number of local workers (>= 1).")
flags.DEFINE_string("workdir", None, "The run's working directory.")
flags.DEFINE_integer("timeout", 3600, "Seconds to wait for the workers.")
FLAGS = flags.FLAGS


def worker_command(train_args: Sequence[str], workdir: str) -> List[str]:
  return [sys.executable, "-m", "tfdpprune.train", *train_args,
          f"--workdir={workdir}", "--distribute=multi_worker"]


def main(argv):
  if FLAGS.num_workers < 1:
    raise app.UsageError(f"--num_workers={FLAGS.num_workers} must be >= 1")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  train_args = argv[1:]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  configs = tf_configs(free_ports(FLAGS.num_workers))
  procs = []
  for i, tf_config in enumerate(configs):
    env = dict(os.environ, TF_CONFIG=tf_config)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = open(os.path.join(FLAGS.workdir, f"worker_{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(worker_command(train_args, FLAGS.workdir),
                                   env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
    logging.info("started worker %d: %s", i, tf_config)

  def forward(signum, frame):
    del frame
    for p, _ in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  codes = []
  for i, (p, log) in enumerate(procs):
    try:
      codes.append(p.wait(timeout=FLAGS.timeout))
    except subprocess.TimeoutExpired:
      forward(signal.SIGTERM, None)
      codes.append(p.wait())
    log.close()
    logging.info("worker %d exited with %d", i, codes[-1])
  if any(codes):
    logging.error("workers failed: exit codes %s; see %s/worker_*.log", codes,
                  FLAGS.workdir)
    sys.exit(1)
  with open(os.path.join(FLAGS.workdir, "results.json")) as f:
    results = json.load(f)
  print(f"{FLAGS.num_workers} workers finished: test accuracy "
        f"{results['test_accuracy']:.4f}, steps {results['steps']}, "
        f"workdir {FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main)
