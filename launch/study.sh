#!/usr/bin/env bash
# The Fashion-MNIST study (issue 10, docs/RESULTS.md), end to end:
#
#   bash launch/study.sh [OUT] [STAGES]     # OUT default runs/study
#
# STAGES is a comma list of tune,screen,scatter,final,report (default: all, in
# order);
# DRY_RUN=1 prints the trainer commands instead of running them.
# Every stage is a set of `launch.sweep` runs: rerunning the same command skips
# finished runs and resumes interrupted ones, so the study survives a crash.
# Needs full Fashion-MNIST (apt-get install -y dataset-fashion-mnist, or tfds).
#
#   tune    seed 0, 10 % validation split carved from the training set:
#           learning rate x batch size x epochs for plain DP-SGD at eps 1 and 3
#           (28 runs). Chose flags/fashion_mnist/dpsgd_eps{1,3}.cfg.
#   screen  seed 0, validation split, EMA on (its runs also report the last
#           iterate): per eps in {1,3} the constant/cosine schedule, select
#           random x 5 sparsities, select random 80/90 % at twice the
#           learning rate, select magnitude, freeze random, GroupNorm, the
#           x2-wide model pruned back to the base parameter count, and
#           augmentation multiplicity K = 2 at eps 3; at eps 1, selection
#           re-drawn every epoch (29 steps) instead of every step,
#           per-layer vs global magnitude selection, public pre-training
#           with and without layer freezing, public-gradient selection, and
#           the x4-wide model pruned back to the base count (38 runs).
#           Chose flags/fashion_mnist/best_eps{1,3}.cfg.
#   scatter seed 0, validation split: ScatterNet + linear (scattering features,
#           Tramer & Boneh 2021), learning rate at eps 1 and 3, and selection
#           on its Dense layer at eps 1 (16 runs). Chose best_eps{1,3}.cfg.
#   final   held-out seeds 1,2,3 on the test set: dpsgd_eps{1,3}.cfg (=
#           best_eps{1,3}.cfg), select random / magnitude 80 % at eps 1, and
#           the eps sweep of plain DP-SGD (0.5, 2, 8; seed 1); ScatterNet +
#           linear (= best_eps{1,3}.cfg) at eps 1 and 3 and its eps sweep.
#           24 runs.
#   report  python -m launch.study_report: tables (report.md) and figures.
#
# Measured on the 2-core machine, two runs at once: 4-5.5 min per CNN run (GroupNorm
# and the x2-wide model 9.5-11 min), 3.6-6.8 min per ScatterNet run once its
# features are cached, so the 106 runs take about 5 hours. The scattering
# features are computed once into $TFDPPRUNE_FEATURE_CACHE (default
# ~/.cache/tfdpprune/features): a transform of the private data, kept outside
# the study's (released) run directories.
# The privacy cost of the search: tuning and screening read only the training
# split and a validation split carved from it (never the test set); their runs
# are NOT accounted in the final models' epsilon, as is usual in the papers we
# compare with (the reported eps is that of one training run, not of the
# search).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study}
STAGES=${2:-tune,screen,scatter,final,report}
PY=${PYTHON:-python}
FLAGS_DIR=flags/fashion_mnist
SCREEN_X='--validation_fraction=0.1 --ema_decay=0.995'
SCAT=$FLAGS_DIR/scatternet_linear.cfg
# ScatterNet features are computed once, into a directory outside the study's
# (released) run directories.
export TFDPPRUNE_FEATURE_CACHE=${TFDPPRUNE_FEATURE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tfdpprune/features}

has() { [[ ",$STAGES," == *",$1,"* ]]; }
sweep() {  # sweep OUT BASE GRID SEEDS [EXTRA]
  local out=$1 base=$2 grid=$3 seeds=$4 extra=${5:-}
  echo "== $out"
  $PY -m launch.sweep --base_flagfile="$base" --grid="$grid" --seeds="$seeds" \
    --out="$out" --max_parallel="${MAX_PARALLEL:-1}" --extra_flags="$extra" \
    ${DRY_RUN:+--dry_run}
}

if has tune; then
  sweep "$OUT/tune" $FLAGS_DIR/tempered_cnn.cfg \
    'target_epsilon=1,3;learning_rate=2,4,8;batch_size=1024,2048;epochs=20,40' \
    0 '--validation_fraction=0.1'
  sweep "$OUT/tune" $FLAGS_DIR/tempered_cnn.cfg \
    'target_epsilon=1;learning_rate=1;batch_size=1024,2048;epochs=20,40' \
    0 '--validation_fraction=0.1'
fi

if has screen; then
  for e in 1 3; do
    base=$FLAGS_DIR/dpsgd_eps$e.cfg
    s=$OUT/screen_eps$e
    sweep "$s/plain" "$base" 'lr_schedule=constant,cosine' 0 "$SCREEN_X"
    sweep "$s/select_random" "$base" \
      'prune_mode=select;prune_method=random;sparsity=0.5,0.8,0.9,0.95,0.99' \
      0 "$SCREEN_X"
    lr2=$([ $e = 1 ] && echo 4 || echo 8)  # twice the tuned plain rate
    sweep "$s/select_random_lr" "$base" \
      "prune_mode=select;prune_method=random;sparsity=0.8,0.9;learning_rate=$lr2" \
      0 "$SCREEN_X"
    sweep "$s/select_magnitude" "$base" \
      'prune_mode=select;prune_method=magnitude;sparsity=0.8,0.9' 0 "$SCREEN_X"
    sweep "$s/freeze_random" "$base" \
      'prune_mode=freeze;prune_method=random;sparsity=0.5,0.9' 0 "$SCREEN_X"
    sweep "$s/group" "$base" 'model_norm=group' 0 "$SCREEN_X"
    if [ $e = 1 ]; then  # how and how often to select, at eps 1 only
      sweep "$s/epoch_select_random_lr" "$base" \
        'prune_mode=select;prune_method=random;sparsity=0.8;learning_rate=4;every_k_steps=29' \
        0 "$SCREEN_X"
      sweep "$s/scope_select_magnitude_lr" "$base" \
        'prune_mode=select;prune_method=magnitude;sparsity=0.8;learning_rate=4;prune_scope=per_layer,global' \
        0 "$SCREEN_X"
      # Public data: pre-training on a 10 % public split, then DP fine-tuning
      # (all layers, or with whole layers frozen by public gradients), and
      # selection by public gradients on a 2 % public split.
      sweep "$s/public_pretrain" "$base" \
        'public_fraction=0.1;public_pretrain_epochs=10' 0 "$SCREEN_X"
      sweep "$s/public_pretrain_freeze_layers" "$base" \
        'public_fraction=0.1;public_pretrain_epochs=10;prune_mode=freeze;pruned=keep;granularity=layer;prune_scope=global;prune_method=public_gradient;sparsity=0.5' \
        0 "$SCREEN_X"
      sweep "$s/public_gradient_select_lr" "$base" \
        'public_fraction=0.02;prune_mode=select;prune_method=public_gradient;sparsity=0.8;learning_rate=4' \
        0 "$SCREEN_X"
      # x4 channels: 398,922 parameters; updating 6.5 % of them per step is
      # the base model's count. About 30 min alone.
      sweep "$s/wide4" "$base" 'model_width=4;sparsity=0.935' 0 \
        "$SCREEN_X --prune_mode=select --prune_method=random"
    fi
    if [ $e = 3 ]; then  # K x the compute: measured at eps 3 only
      sweep "$s/augmult" "$base" 'augmult=2' 0 "$SCREEN_X"
    fi
    # x2 channels: 101,162 parameters; updating 25.7 % of them per step is the
    # base model's 26,010.
    sweep "$s/wide2" "$base" 'model_width=2;sparsity=0.743' 0 \
      "$SCREEN_X --prune_mode=select --prune_method=random"
  done
fi

if has scatter; then
  # ScatterNet + linear (scatternet_linear.cfg): the learning rate at eps 1
  # and 3, then selection on its one Dense layer at eps 1 (seed 0,
  # validation split, no EMA).
  sweep "$OUT/scatternet/tune_eps1" $SCAT \
    'target_epsilon=1;learning_rate=2,4,8,16,32' 0 '--validation_fraction=0.1'
  sweep "$OUT/scatternet/tune_eps3" $SCAT \
    'target_epsilon=3;learning_rate=4,8,16,32,64' 0 '--validation_fraction=0.1'
  sweep "$OUT/scatternet/screen_eps1/select_random" $SCAT \
    'target_epsilon=1;prune_mode=select;prune_method=random;sparsity=0.5,0.8,0.9;learning_rate=8,16' \
    0 '--validation_fraction=0.1'
fi

if has final; then
  # The tanh CNN: plain DP-SGD (no screened change beat it on the validation
  # split) and, for random vs magnitude with error bars, select 80 % at the
  # learning rate that suited it.
  for e in 1 3; do
    sweep "$OUT/final/dpsgd/eps$e" $FLAGS_DIR/dpsgd_eps$e.cfg \
      "target_epsilon=$e" 1,2,3
  done
  sweep "$OUT/final/dpsgd/eps_low" $FLAGS_DIR/dpsgd_eps1.cfg \
    'target_epsilon=0.5' 1
  sweep "$OUT/final/dpsgd/eps_high" $FLAGS_DIR/dpsgd_eps3.cfg \
    'target_epsilon=2,8' 1
  for m in random magnitude; do
    sweep "$OUT/final/select_${m}_80/eps1" $FLAGS_DIR/dpsgd_eps1.cfg \
      'target_epsilon=1' 1,2,3 \
      "--prune_mode=select --prune_method=$m --sparsity=0.8 --learning_rate=4"
  done
  # ScatterNet + linear at the tuned learning rates (= best_eps{1,3}.cfg: no
  # selection setting beat it on the validation split), and its eps sweep.
  sweep "$OUT/final/scatternet/eps1" $SCAT 'target_epsilon=1' 1,2,3 \
    '--learning_rate=8'
  sweep "$OUT/final/scatternet/eps_low" $SCAT 'target_epsilon=0.5' 1 \
    '--learning_rate=8'
  sweep "$OUT/final/scatternet/eps3" $SCAT 'target_epsilon=3' 1,2,3 \
    '--learning_rate=32'
  sweep "$OUT/final/scatternet/eps_high" $SCAT 'target_epsilon=2,8' 1 \
    '--learning_rate=32'
fi

if has report; then
  $PY -m launch.study_report --study_dir="$OUT"
fi
