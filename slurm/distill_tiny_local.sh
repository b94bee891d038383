#!/bin/bash
# sbatch slurm/distill_tiny_local.sh          (from the repository root)
#
# The stages of slurm/distill_70b_to_8b.sh on the tiny config, on CPU, through the same launcher
# (launchers/slurm.sh), in one job across two nodes:
#   generate with GENERATE_TEACHER set (a Hugging Face checkpoint with the tiny tokenizer, e.g. the
#            exported tiny student of the README's tiny chain): conf/generate_tiny.yaml's problems ->
#            sampled traces with its per-token log-probs, the two nodes as two independent workers
#            (each its own shards); prepare then reads those traces; unset: skipped
#   prepare  examples/tiny traces (or generate's) -> packed store       (1 task, first node)
#   score    with TEACHER_NEMO set (a NeMo 2 checkpoint with the traces' tokenizer, e.g. from
#            `nemo-dcod import`): its log-probs and top-4 replace the generation engine's in the
#            store, data-parallel over the two nodes (each scores its own shards); unset: skipped,
#            and the engine's log-probs the traces carry stay the teacher signal
#   train    the tiny student, TP=2 across the two nodes (1 rank per node, gloo)
#   export   the final checkpoint -> Hugging Face                          (1 task)
#   eval     the exported model on the tiny benchmarks                     (1 task)
# Stages run in order in this one job (a failure ends it); each has its log in $RUN_ROOT/logs/.
#
# Preemption: SIGUSR1 to this batch shell (the --signal below, 60 s before the time limit, or
# `scancel --batch --signal=USR1 <job>`) reaches the launcher sourced here, which has rank 0 stop
# training: every rank saves a checkpoint at the end of the step and exits, and the launcher
# requeues the job. The requeued job runs this script again: prepare finds its store complete,
# training resumes from the newest complete checkpoint, and the stages after it run once.
#
# Every setting is an environment variable (sbatch passes the environment on), e.g.
#   RUN_ROOT=runs/x TRAIN_STEPS=6 STAGES="prepare train" sbatch slurm/distill_tiny_local.sh
#
#SBATCH --job-name=dcod-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT=${DCOD_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
[[ -f launchers/slurm.sh ]] || { echo "$ROOT/launchers/slurm.sh not found: submit from the repository root or set DCOD_ROOT" >&2; exit 2; }
# shellcheck source=launchers/slurm.sh
source launchers/slurm.sh # dcod_launch, and the batch shell's USR1/TERM traps

NEMO_DCOD=${NEMO_DCOD:-$([[ -x .venv/bin/nemo-dcod ]] && echo "$ROOT/.venv/bin/nemo-dcod" || echo nemo-dcod)}
RUN_ROOT=${RUN_ROOT:-runs/slurm_tiny}
STAGES=${STAGES:-generate prepare score train export eval}
STORE=${STORE:-$RUN_ROOT/store}
GENERATE_TEACHER=${GENERATE_TEACHER:-}       # empty: no generation (see above)
GENERATE_CONFIG=${GENERATE_CONFIG:-conf/generate_tiny.yaml}
GENERATE_OVERRIDES=${GENERATE_OVERRIDES:-} # more key=value pairs, space-separated
TRACES=${TRACES:-$RUN_ROOT/generate}
# Default: generate's traces (the prepare.yaml it writes) when it runs, else the example traces.
generated=$([[ -n $GENERATE_TEACHER && " $STAGES " == *" generate "* ]] && echo 1 || echo 0)
PREPARE_CONFIG=${PREPARE_CONFIG:-$( ((generated)) && echo "$TRACES/prepare.yaml" || echo conf/prepare_tiny.yaml)}
TEACHER_NEMO=${TEACHER_NEMO:-}       # empty: no scoring (see above)
SCORE_CONFIG=${SCORE_CONFIG:-conf/score_tiny.yaml}
SCORE_OVERRIDES=${SCORE_OVERRIDES:-} # more key=value pairs, space-separated
TRAIN_CONFIG=${TRAIN_CONFIG:-conf/train_store_tiny.yaml}
TRAIN_TP=${TRAIN_TP:-2}            # tensor-parallel across the two nodes
TRAIN_STEPS=${TRAIN_STEPS:-20}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-} # more key=value pairs, space-separated
TOKENIZER=${TOKENIZER:-examples/tiny/tokenizer}
EVAL_CONFIG=${EVAL_CONFIG:-conf/eval_tiny.yaml}
LOG_DIR=${LOG_DIR:-$RUN_ROOT/logs}
# One thread per rank: the two "nodes" may share a few CPU cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo "[$(date -u +%FT%TZ)] stage $1 (job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0})" >&2; }
mkdir -p "$LOG_DIR"

if has generate; then
  stage generate
  if ((!generated)); then
    echo "generate: skipped (GENERATE_TEACHER is unset): prepare reads $PREPARE_CONFIG's traces" >&2
  else
    # Resumable: a requeued job skips the shards already written.
    # shellcheck disable=SC2086  # GENERATE_OVERRIDES is a list of key=value words
    dcod_launch --log "$LOG_DIR/generate.log" -- \
      "$NEMO_DCOD" generate --config "$GENERATE_CONFIG" teacher="$GENERATE_TEACHER" out_dir="$TRACES" \
      $GENERATE_OVERRIDES
  fi
fi

if has prepare; then
  stage prepare
  seq=()
  ((!generated)) || seq=(seq_length=128) # the tiny student's rows (conf/train_store_tiny.yaml)
  dcod_launch --single --log "$LOG_DIR/prepare.log" -- \
    "$NEMO_DCOD" prepare --config "$PREPARE_CONFIG" out_dir="$STORE" ${seq[@]+"${seq[@]}"}
fi

if has score; then
  stage score
  if [[ -z $TEACHER_NEMO ]]; then
    echo "score: skipped (TEACHER_NEMO is unset): the traces' generation log-probs are the teacher signal" >&2
  else
    # The teacher's own tokenizer (tokenizer=null) must map every id as the store's does (checked).
    # shellcheck disable=SC2086  # SCORE_OVERRIDES is a list of key=value words
    dcod_launch --log "$LOG_DIR/score.log" -- \
      "$NEMO_DCOD" score --config "$SCORE_CONFIG" checkpoint="$TEACHER_NEMO" store="$STORE" what=teacher \
      tokenizer=null overwrite=true parallel.tensor_model_parallel_size=1 $SCORE_OVERRIDES
  fi
fi

if has train; then
  stage train
  # shellcheck disable=SC2086  # TRAIN_OVERRIDES is a list of key=value words
  dcod_launch --log "$LOG_DIR/train.log" -- \
    "$NEMO_DCOD" train --config "$TRAIN_CONFIG" run_dir="$RUN_ROOT/train" \
    data.source=store data.path="$STORE" parallel.tensor_model_parallel_size="$TRAIN_TP" \
    trainer.max_steps="$TRAIN_STEPS" $TRAIN_OVERRIDES
fi

if has export; then
  stage export
  checkpoint=$(find "$RUN_ROOT/train/checkpoints" -maxdepth 1 -name '*-last' 2>/dev/null | sort -V | tail -n 1)
  [[ -n $checkpoint ]] || { echo "export: no *-last checkpoint in $RUN_ROOT/train/checkpoints" >&2; exit 1; }
  dcod_launch --single --skip-missing --log "$LOG_DIR/export.log" -- \
    "$NEMO_DCOD" export --checkpoint "$checkpoint" --hf-out "$RUN_ROOT/export/hf" \
    --tokenizer "$TOKENIZER" --overwrite
fi

if has eval; then
  stage eval
  dcod_launch --single --skip-missing --log "$LOG_DIR/eval.log" -- \
    "$NEMO_DCOD" eval --config "$EVAL_CONFIG" "models=[{path: $RUN_ROOT/export/hf, label: tiny}]" \
    out_dir="$RUN_ROOT/eval"
fi
echo "[$(date -u +%FT%TZ)] pipeline done: $RUN_ROOT" >&2
