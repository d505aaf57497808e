r"""The README's audit table: empirical epsilon lower bounds vs the accountant.

  python -m launch.audit                       # ~2 min on 2 cores
  python -m launch.audit --sigmas=1 --steps=1 --trials=200
  python -m launch.audit --keras=3             # the Keras 3 private model's step

For every noise multiplier x steps x canary (selected / masked) it runs
`tfdpprune.audit.audit_optimizer` (white-box Dirac gradient canary, the real
optimizer with secret noise) and prints a Markdown table, plus the broken
setting sigma = 0.01 that an audit must catch.
"""

import time

from absl import app
from absl import flags

from tfdpprune import audit

flags.DEFINE_list("sigmas", ["0.5", "1", "2"], "Noise multipliers.")
flags.DEFINE_list("steps", ["1", "5"], "Steps T per training.")
flags.DEFINE_integer("trials", 1000, "Trainings per world (D, D + canary).")
flags.DEFINE_float("broken_sigma", 0.01, "A broken setting the audit must "
                   "catch (0 to skip).")
flags.DEFINE_float("delta", 1e-5, "Delta of both figures.")
flags.DEFINE_enum("keras", "2", ["2", "3"], "Audit the Keras 2 optimizer or "
                  "the Keras 3 private model's train step.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  settings = [(float(s), int(t), masked) for s in FLAGS.sigmas
              for t in FLAGS.steps for masked in (False, True)]
  if FLAGS.broken_sigma:
    settings.append((FLAGS.broken_sigma, 1, False))
  print(f"| σ | T | canary | audit ε lower bound (95 %) | accountant ε (RDP) "
        f"| TPR / FPR (held-out) | s |")
  print("|---|---|---|---|---|---|---|")
  for sigma, steps, masked in settings:
    start = time.time()
    r = audit.audit_optimizer(sigma, steps=steps, trials=FLAGS.trials,
                              masked_canary=masked, delta=FLAGS.delta,
                              keras_version=int(FLAGS.keras))
    print(f"| {sigma:g} | {steps} | {'masked' if masked else 'selected'} | "
          f"{r.epsilon_lower_bound:.2f} | {r.epsilon:.2f} | "
          f"{r.true_positive_rate:.3f} / {r.false_positive_rate:.3f} | "
          f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
