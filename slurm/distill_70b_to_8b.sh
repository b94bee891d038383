#!/bin/bash
# sbatch slurm/distill_70b_to_8b.sh        (from the repository root, on the cluster's login node)
#
# DisCorD at cluster scale: a Llama-3.x-70B-Instruct teacher's traces distilled into a
# Llama-3.1-8B student on 8xH100 nodes, in four (five) jobs chained with `afterok` dependencies:
#   0 generate  (only with generate in STAGES; a user who brings traces leaves it out) the teacher's
#             traces of the problems of GENERATE_CONFIG (conf/generate_llama70b.yaml: GSM8K train,
#             4 samples each, vLLM with TP=8 over a node's GPUs), one independent worker per node
#             taking every GENERATE_NODES-th shard, each trace with the teacher's per-token log-probs
#             and its verdict; the score job's prepare then reads them (inputs=$TRACES/traces/*.jsonl,
#             PREPARE_CONFIG defaulting to conf/generate_llama70b_prepare.yaml)
#   1 score   [prepare the traces into the packed store if PREPARE_CONFIG is set; import the
#             teacher if TEACHER_HF is set] then the 70B teacher's log-probs (and top-k) of every
#             trace token: TP=8 within a node, PP across nodes if SCORE_PP > 1, the remaining
#             ranks data-parallel (SCORE_NODES x 8 / (TP x PP) replicas)
#   2 train   [import the student if STUDENT_HF is set] then the 8B student with DisCorD:
#             conf/distill_llama8b.yaml (4 nodes: TP=2 + sequence parallel within a node, DP=16,
#             bf16 + FP8 through Transformer Engine, distributed optimizer), preemptible
#   3 export  the final checkpoint -> Hugging Face (safetensors, verified by logit parity) and a
#             plain NeMo 2 / Megatron distributed checkpoint
#   4 eval    the exported model on the math benchmarks of EVAL_CONFIG
#
# How: submitted as is, this script is a small driver job (1 node, 1 CPU, minutes) that submits
# the four stage jobs -- this same file with DCOD_STAGE=<stage> and the stage's own --nodes,
# --gpus-per-node and --time on the sbatch command line (they override the #SBATCH lines below;
# the rest, signal and requeue included, is shared) -- prints their job ids and exits.
# `bash slurm/distill_70b_to_8b.sh` submits the same four jobs from the login node, without the
# driver job. A failed stage cancels the stages after it (--kill-on-invalid-dep).
#
# Before submitting, the driver dry-runs generate (reads every problem, renders every prompt,
# checks lengths against the teacher's context; loads no model), prepare (with PREPARE_CONFIG),
# score and train as
# configured (`--dry-run`: every check the job applies at start, against the store or, before it
# exists, the store plan the earlier dry runs write; the parallel layout; a per-GPU memory estimate
# against DCOD_GPU_MEMORY_GIB, 72 GiB of an 80 GB H100 by default) and stops on a problem. A stage the installed nemo-dcod does
# not have fails its job, unless ALLOW_MISSING_STAGES=1, which logs it as skipped.
#
# Preemption: Slurm sends SIGUSR1 to the batch shell 300 s before the time limit (B: = the batch
# shell alone, so the helper processes of Megatron's checkpoint writer are not hit; override with
# SBATCH_SIGNAL=B:USR1@<seconds>); an operator can send it with `scancel --batch --signal=USR1
# <job>`. launchers/slurm.sh forwards it to rank 0, the ranks save a checkpoint at the end of the
# step and exit, the launcher requeues the job (--requeue), and it resumes from that checkpoint.
#
# Settings (environment variables; sbatch passes them on to every stage job):
#   where      DCOD_ROOT (the checkout on the shared filesystem; default: the submit directory),
#              NEMO_DCOD (one executable: the nemo-dcod entry point; default: nemo-dcod on PATH),
#              RUN_ROOT (all outputs), LOG_DIR (one log per stage and job)
#   cluster    PARTITION, ACCOUNT, QOS (unset: the cluster's defaults), GPUS_PER_NODE (8; 0: CPU
#              nodes with CPU_TASKS_PER_NODE ranks each), CPUS_PER_TASK, CONTAINER_IMAGE (pyxis,
#              e.g. nvcr.io#nvidia/nemo:25.07; unset: none), CONTAINER_MOUNTS, STAGES
#   0 generate GENERATE_CONFIG, GENERATE_TEACHER (a Hugging Face checkpoint directory; default
#              TEACHER_HF), GENERATE_NODES, GENERATE_TIME, TRACES (its out_dir), GENERATE_OVERRIDES
#   data       STORE (the packed store), PREPARE_CONFIG (+ PREPARE_OVERRIDES)
#   1 score    TEACHER_NEMO, TEACHER_HF, SCORE_CONFIG, SCORE_NODES, SCORE_TP, SCORE_PP, SCORE_TIME,
#              SCORE_OVERRIDES (more key=value words)
#   2 train    TRAIN_CONFIG, TRAIN_NODES, TRAIN_TIME, STUDENT_NEMO (NeMo 2 checkpoint to start from;
#              empty: random init), STUDENT_HF (imported into STUDENT_NEMO first), TRAIN_TP, TRAIN_PP,
#              TRAIN_CP, TRAIN_STEPS, TRAIN_GLOBAL_BATCH, TRAIN_MICRO_BATCH (empty: the config's),
#              TRAIN_OVERRIDES (more key=value words)
#   3 export   HF_OUT, NEMO_OUT, TOKENIZER, EXPORT_GPUS, EXPORT_TIME
#   4 eval     EVAL_CONFIG, EVAL_LABEL, EVAL_OUT, EVAL_GPUS, EVAL_TIME, EVAL_OVERRIDES
#   checks     DCOD_TEST_ONLY=1: `sbatch --test-only` every stage's layout (no dependencies), submit
#              nothing
# e.g. TRAIN_NODES=8 ACCOUNT=llm CONTAINER_IMAGE=nvcr.io#nvidia/nemo:25.07 \
#      CONTAINER_MOUNTS=/lustre:/lustre RUN_ROOT=/lustre/runs/dcod sbatch slurm/distill_70b_to_8b.sh
#
#SBATCH --job-name=dcod-70b-to-8b
#SBATCH --nodes=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT=${DCOD_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
SCRIPT=$ROOT/slurm/distill_70b_to_8b.sh
[[ -f $SCRIPT && -f launchers/slurm.sh ]] || {
  echo "$ROOT is not the nemo_dcod checkout (no slurm/distill_70b_to_8b.sh, launchers/slurm.sh): submit from it or set DCOD_ROOT" >&2
  exit 2
}

# ---------------------------------------------------------------- settings (all overridable)
RUN_ROOT=${RUN_ROOT:-runs/distill_70b_to_8b}
LOG_DIR=${LOG_DIR:-$RUN_ROOT/logs}
NEMO_DCOD=${NEMO_DCOD:-nemo-dcod}
STAGES=${STAGES:-score train export eval}
ALLOW_MISSING_STAGES=${ALLOW_MISSING_STAGES:-0}
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} QOS=${QOS:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPU_TASKS_PER_NODE=${CPU_TASKS_PER_NODE:-1}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-} CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
# 0 generate: vLLM holds the 70B teacher at TP=8 on one node; each node is an independent worker.
GENERATE_CONFIG=${GENERATE_CONFIG:-conf/generate_llama70b.yaml}
GENERATE_TEACHER=${GENERATE_TEACHER:-${TEACHER_HF:-/checkpoints/Llama-3.3-70B-Instruct}}
GENERATE_NODES=${GENERATE_NODES:-2}
GENERATE_TIME=${GENERATE_TIME:-12:00:00}
TRACES=${TRACES:-$RUN_ROOT/traces}
GENERATE_OVERRIDES=${GENERATE_OVERRIDES:-}
# data
STORE=${STORE:-$RUN_ROOT/store}
PREPARE_CONFIG=${PREPARE_CONFIG:-}
PREPARE_OVERRIDES=${PREPARE_OVERRIDES:-}
# 1 score: 70B in bf16 is 141 GB of weights, 17.6 GB per GPU at TP=8: one node holds a replica.
TEACHER_NEMO=${TEACHER_NEMO:-/checkpoints/llama3.3-70b-instruct-nemo}
TEACHER_HF=${TEACHER_HF:-}
SCORE_CONFIG=${SCORE_CONFIG:-conf/score_llama70b.yaml}
SCORE_NODES=${SCORE_NODES:-2}
SCORE_TP=${SCORE_TP:-8}
SCORE_PP=${SCORE_PP:-1}
SCORE_TIME=${SCORE_TIME:-08:00:00}
SCORE_OVERRIDES=${SCORE_OVERRIDES:-}
# 2 train
TRAIN_CONFIG=${TRAIN_CONFIG:-conf/distill_llama8b.yaml}
TRAIN_NODES=${TRAIN_NODES:-4}
TRAIN_TIME=${TRAIN_TIME:-24:00:00}
STUDENT_NEMO=${STUDENT_NEMO-/checkpoints/llama3.1-8b-nemo} # set but empty: random initialisation
STUDENT_HF=${STUDENT_HF:-}
TRAIN_TP=${TRAIN_TP:-} TRAIN_PP=${TRAIN_PP:-} TRAIN_CP=${TRAIN_CP:-}
TRAIN_STEPS=${TRAIN_STEPS:-} TRAIN_GLOBAL_BATCH=${TRAIN_GLOBAL_BATCH:-} TRAIN_MICRO_BATCH=${TRAIN_MICRO_BATCH:-}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
# 3 export
HF_OUT=${HF_OUT:-$RUN_ROOT/export/hf}
NEMO_OUT=${NEMO_OUT:-$RUN_ROOT/export/nemo}
TOKENIZER=${TOKENIZER:-${STUDENT_HF:-$STUDENT_NEMO}}
EXPORT_GPUS=${EXPORT_GPUS:-1}
EXPORT_TIME=${EXPORT_TIME:-02:00:00}
# 4 eval
EVAL_CONFIG=${EVAL_CONFIG:-conf/eval_math.yaml}
EVAL_LABEL=${EVAL_LABEL:-discord-8b}
EVAL_OUT=${EVAL_OUT:-$RUN_ROOT/eval}
EVAL_GPUS=${EVAL_GPUS:-1}
EVAL_TIME=${EVAL_TIME:-04:00:00}
EVAL_OVERRIDES=${EVAL_OVERRIDES:-}
DCOD_TEST_ONLY=${DCOD_TEST_ONLY:-0}
export RUN_ROOT LOG_DIR NEMO_DCOD STAGES ALLOW_MISSING_STAGES GPUS_PER_NODE CPU_TASKS_PER_NODE \
  CPUS_PER_TASK CONTAINER_IMAGE CONTAINER_MOUNTS GENERATE_CONFIG GENERATE_TEACHER GENERATE_NODES TRACES \
  GENERATE_OVERRIDES STORE PREPARE_CONFIG PREPARE_OVERRIDES TEACHER_NEMO \
  TEACHER_HF SCORE_CONFIG SCORE_NODES SCORE_TP SCORE_PP SCORE_OVERRIDES TRAIN_CONFIG TRAIN_NODES STUDENT_NEMO STUDENT_HF \
  TRAIN_TP TRAIN_PP TRAIN_CP TRAIN_STEPS TRAIN_GLOBAL_BATCH TRAIN_MICRO_BATCH TRAIN_OVERRIDES HF_OUT \
  NEMO_OUT TOKENIZER EVAL_CONFIG EVAL_LABEL EVAL_OUT EVAL_OVERRIDES

has() { [[ " $STAGES " == *" $1 "* ]]; }
# With generate in STAGES, prepare reads its traces by default.
if has generate && [[ -z $PREPARE_CONFIG ]]; then PREPARE_CONFIG=conf/generate_llama70b_prepare.yaml; fi

# The generate stage's key=value overrides, in the array `overrides` (its dry run uses them too).
generate_overrides() {
  overrides=(teacher="$GENERATE_TEACHER" out_dir="$TRACES")
  # shellcheck disable=SC2206  # GENERATE_OVERRIDES is a list of key=value words
  overrides+=($GENERATE_OVERRIDES)
}

# The prepare step's key=value overrides, in the array `overrides`: with generate in STAGES, its
# traces (and the teacher's tokenizer, which the student shares) unless PREPARE_OVERRIDES says otherwise.
prepare_overrides() {
  overrides=(out_dir="$STORE")
  ! has generate || overrides+=("inputs=[$TRACES/traces/shard-*.jsonl]" tokenizer="$GENERATE_TEACHER")
  # shellcheck disable=SC2206  # PREPARE_OVERRIDES is a list of key=value words
  overrides+=($PREPARE_OVERRIDES)
}

# The score stage's key=value overrides, in the array `overrides`.
score_overrides() {
  overrides=(store="$STORE" checkpoint="$TEACHER_NEMO" parallel.tensor_model_parallel_size="$SCORE_TP"
    parallel.pipeline_model_parallel_size="$SCORE_PP")
  # shellcheck disable=SC2206  # SCORE_OVERRIDES is a list of key=value words
  overrides+=($SCORE_OVERRIDES)
}

# The train stage's key=value overrides, in the array `overrides` (the driver's dry run uses them too).
train_overrides() {
  overrides=(run_dir="$RUN_ROOT/train" data.source=store data.path="$STORE")
  [[ -z $STUDENT_NEMO ]] || overrides+=(model.init_from="$STUDENT_NEMO")
  [[ -z $TRAIN_TP ]] || overrides+=(parallel.tensor_model_parallel_size="$TRAIN_TP")
  [[ -z $TRAIN_PP ]] || overrides+=(parallel.pipeline_model_parallel_size="$TRAIN_PP")
  [[ -z $TRAIN_CP ]] || overrides+=(parallel.context_parallel_size="$TRAIN_CP")
  [[ -z $TRAIN_STEPS ]] || overrides+=(trainer.max_steps="$TRAIN_STEPS")
  [[ -z $TRAIN_GLOBAL_BATCH ]] || overrides+=(trainer.global_batch_size="$TRAIN_GLOBAL_BATCH")
  [[ -z $TRAIN_MICRO_BATCH ]] || overrides+=(trainer.micro_batch_size="$TRAIN_MICRO_BATCH")
  # shellcheck disable=SC2206  # TRAIN_OVERRIDES is a list of key=value words
  overrides+=($TRAIN_OVERRIDES)
}
tasks_per_node=$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : CPU_TASKS_PER_NODE))

# ---------------------------------------------------------------- driver: submit the stage jobs
submit_stages() {
  local -a common=(--chdir="$ROOT")
  [[ -z $PARTITION ]] || common+=(--partition="$PARTITION")
  [[ -z $ACCOUNT ]] || common+=(--account="$ACCOUNT")
  [[ -z $QOS ]] || common+=(--qos="$QOS")
  problems=()
  [[ -f $GENERATE_CONFIG ]] || ! has generate || problems+=("GENERATE_CONFIG=$GENERATE_CONFIG not found")
  [[ -f $GENERATE_TEACHER/config.json ]] || ! has generate ||
    problems+=("GENERATE_TEACHER=$GENERATE_TEACHER is not a Hugging Face checkpoint (no config.json): set GENERATE_TEACHER (or TEACHER_HF), or leave generate out of STAGES and bring traces")
  ((SCORE_NODES * tasks_per_node % (SCORE_TP * SCORE_PP) == 0)) ||
    problems+=("SCORE_NODES x tasks per node = $((SCORE_NODES * tasks_per_node)) ranks is not a multiple of SCORE_TP x SCORE_PP = $((SCORE_TP * SCORE_PP))")
  ((GPUS_PER_NODE == 0 || SCORE_TP <= GPUS_PER_NODE)) ||
    problems+=("SCORE_TP=$SCORE_TP > GPUS_PER_NODE=$GPUS_PER_NODE: keep tensor parallelism within a node (NVLink), use SCORE_PP across nodes")
  [[ -f $SCORE_CONFIG ]] || ! has score || problems+=("SCORE_CONFIG=$SCORE_CONFIG not found")
  [[ -d $TEACHER_NEMO || -n $TEACHER_HF ]] || ! has score ||
    problems+=("TEACHER_NEMO=$TEACHER_NEMO not found: import the teacher (nemo-dcod import --hf DIR --out DIR), or set TEACHER_HF to have the score job import it")
  [[ -f $TRAIN_CONFIG ]] || ! has train || problems+=("TRAIN_CONFIG=$TRAIN_CONFIG not found")
  [[ -z $STUDENT_NEMO || -d $STUDENT_NEMO || -n $STUDENT_HF ]] || ! has train ||
    problems+=("STUDENT_NEMO=$STUDENT_NEMO not found: import the student (nemo-dcod import, or set STUDENT_HF), or STUDENT_NEMO= for a random initialisation")
  [[ -f $EVAL_CONFIG ]] || ! has eval ||
    problems+=("EVAL_CONFIG=$EVAL_CONFIG not found: write one (conf/eval_tiny.yaml shows the format) or leave eval out of STAGES")
  [[ -n $PREPARE_CONFIG || -f $STORE/manifest.json ]] || ! has score ||
    problems+=("STORE=$STORE holds no prepared store and PREPARE_CONFIG is unset: set PREPARE_CONFIG (conf/prepare_tiny.yaml shows the format) to prepare the traces")
  if ((${#problems[@]})); then
    printf 'distill_70b_to_8b.sh: %s\n' "${problems[@]}" >&2
    ((DCOD_TEST_ONLY)) || exit 2
  fi
  # Each stage's dry run: the checks its job applies at start, as its job will see them, and its
  # per-GPU memory estimate (no GPU needed). Where the store does not exist yet, each checks
  # against the store plan the dry runs before it wrote (prepare: rows, vocabulary, teacher
  # log-probs of the traces; score: its columns); what an earlier job makes (traces, imported
  # checkpoints) is checked by that job (--made-later). Skipped where nemo-dcod is not installed
  # outside the container.
  mkdir -p "$LOG_DIR"
  local plan=$LOG_DIR/store.plan.json dry_stage dry_config
  local -a dry_flags dry_launch
  rm -f "$plan"
  for dry_stage in generate prepare score train; do
    case $dry_stage in
      prepare) if [[ -z $PREPARE_CONFIG ]] || ! has score; then continue; fi ;;
      *) if ! has "$dry_stage"; then continue; fi ;;
    esac
    if ! command -v "$NEMO_DCOD" >/dev/null; then
      echo "$dry_stage: dry run skipped ($NEMO_DCOD is not installed here)" >&2
      continue
    fi
    dry_flags=(--store-plan "$plan") dry_launch=()
    case $dry_stage in
      generate)
        generate_overrides
        dry_config=$GENERATE_CONFIG dry_flags=()
        ;;
      prepare)
        prepare_overrides
        dry_config=$PREPARE_CONFIG
        ! has generate || dry_flags+=(--made-later)
        ;;
      score)
        score_overrides
        dry_config=$SCORE_CONFIG dry_launch=(trainer.devices="$tasks_per_node" trainer.num_nodes="$SCORE_NODES")
        [[ -d $TEACHER_NEMO ]] || dry_flags+=(--made-later) # imported from TEACHER_HF by the job
        ;;
      train)
        train_overrides
        dry_config=$TRAIN_CONFIG dry_launch=(trainer.devices="$tasks_per_node" trainer.num_nodes="$TRAIN_NODES")
        [[ -z $STUDENT_NEMO || -d $STUDENT_NEMO ]] || dry_flags+=(--made-later) # imported from STUDENT_HF
        ;;
    esac
    [[ -f $dry_config ]] || continue # reported above
    "$NEMO_DCOD" "$dry_stage" --config "$dry_config" --dry-run ${dry_flags[@]+"${dry_flags[@]}"} "${overrides[@]}" \
      ${dry_launch[@]+"${dry_launch[@]}"} || {
      echo "distill_70b_to_8b.sh: the $dry_stage stage is not runnable as configured (above)" >&2
      ((DCOD_TEST_ONLY)) || exit 2
    }
  done
  # A driver running as a job: its SLURM_* variables must not leak into the stage jobs' srun.
  local v
  for v in $(compgen -e | grep '^SLURM_' || true); do [[ $v == SLURM_CONF ]] || unset "$v"; done

  local previous="" stage nodes gpus time id failed=0
  local -a layout args
  for stage in generate score train export eval; do
    has "$stage" || continue
    case $stage in
      generate) nodes=$GENERATE_NODES gpus=$GPUS_PER_NODE time=$GENERATE_TIME ;;
      score) nodes=$SCORE_NODES gpus=$GPUS_PER_NODE time=$SCORE_TIME ;;
      train) nodes=$TRAIN_NODES gpus=$GPUS_PER_NODE time=$TRAIN_TIME ;;
      export) nodes=1 gpus=$((GPUS_PER_NODE > 0 ? EXPORT_GPUS : 0)) time=$EXPORT_TIME ;;
      eval) nodes=1 gpus=$((GPUS_PER_NODE > 0 ? EVAL_GPUS : 0)) time=$EVAL_TIME ;;
    esac
    layout=(--nodes="$nodes" --time="$time" --cpus-per-task="$CPUS_PER_TASK")
    if [[ $stage == score || $stage == train ]]; then
      layout+=(--ntasks-per-node="$tasks_per_node")
    elif [[ $stage == generate ]]; then # one engine per node, over all its GPUs (vLLM's TP)
      layout+=(--ntasks-per-node=1)
    else
      layout+=(--ntasks-per-node=1)
    fi
    # GPU jobs take whole nodes: NVLink/InfiniBand topology and host memory are not shared.
    ((gpus == 0)) || layout+=(--gpus-per-node="$gpus" --exclusive --mem=0)
    args=(--job-name="dcod-$stage" --output="$LOG_DIR/%x-%j.out" --export="ALL,DCOD_ROOT=$ROOT,DCOD_STAGE=$stage"
      "${common[@]}" "${layout[@]}")
    if ((DCOD_TEST_ONLY)); then
      if sbatch --test-only "${args[@]}" "$SCRIPT"; then
        echo "$stage: ok (${layout[*]})"
      else
        echo "$stage: the cluster cannot run this layout (${layout[*]})" >&2
        failed=1
      fi
      continue
    fi
    [[ -z $previous ]] || args+=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    id=$(sbatch --parsable "${args[@]}" "$SCRIPT")
    id=${id%%;*}
    echo "$stage: job $id (${layout[*]}${previous:+, after $previous}), log $LOG_DIR/dcod-$stage-$id.out"
    previous=$id
  done
  return "$failed"
}

if [[ -z ${DCOD_STAGE:-} ]]; then
  if ((${SLURM_RESTART_COUNT:-0} > 0)); then # a requeued driver job (--requeue is shared)
    echo "driver job $SLURM_JOB_ID restarted: its stage jobs were submitted by the first run; not again" >&2
    exit 0
  fi
  submit_stages
  exit $?
fi

# ---------------------------------------------------------------- a stage job
# shellcheck source=launchers/slurm.sh
source launchers/slurm.sh # dcod_launch, and the batch shell's USR1/TERM traps

# CUDA / NCCL for Megatron on H100 nodes (each overridable from the environment).
# Megatron's TP / SP communication overlaps computation only if kernels reach the GPU in issue
# order: one hardware work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A failed or timed-out collective aborts its rank (and srun --kill-on-bad-exit the step) instead
# of hanging every rank until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Free the buffers of asynchronous collectives without recordStream: the caching allocator holds
# less memory (the setting Megatron-LM's examples use).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# NVLink SHARP buffers cost GPU memory per communicator; TP=2/8 all-reduces are small. 1 to enable.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# InfiniBand retransmit timeout 4.096 us x 2^22 (~17 s): rides out congestion on a busy fabric.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# WARN: only problems. INFO prints the rings, trees and transports NCCL chose (topology debugging).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Packed sequences of varying length fragment the caching allocator less with expandable segments.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# CPU threads per rank (torch intra-op): the node's cores are shared by its ranks.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS_PER_TASK / 2 > 0 ? CPUS_PER_TASK / 2 : 1))}
# Compute nodes have no internet: tokenizers and configs come from local folders only.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export PYTHONUNBUFFERED=1

skip=()
((ALLOW_MISSING_STAGES)) && skip=(--skip-missing)
echo "[$(date -u +%FT%TZ)] stage $DCOD_STAGE: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}" >&2

case $DCOD_STAGE in
  generate)
    # One worker per node (srun's SLURM_PROCID / SLURM_NTASKS), each its own shards; resumable: a
    # requeued or re-submitted job skips the finished shards and redoes one cut off mid-write.
    generate_overrides
    dcod_launch ${skip[@]+"${skip[@]}"} --log "$LOG_DIR/generate.log" -- \
      "$NEMO_DCOD" generate --config "$GENERATE_CONFIG" "${overrides[@]}"
    ;;
  score)
    if [[ -n $PREPARE_CONFIG ]]; then # resumable: a finished store makes it a no-op
      prepare_overrides
      dcod_launch --single --log "$LOG_DIR/prepare.log" -- \
        "$NEMO_DCOD" prepare --config "$PREPARE_CONFIG" "${overrides[@]}"
    fi
    if [[ -n $TEACHER_HF && ! -d $TEACHER_NEMO ]]; then
      dcod_launch --single --log "$LOG_DIR/import_teacher.log" -- \
        "$NEMO_DCOD" import --hf "$TEACHER_HF" --out "$TEACHER_NEMO"
    fi
    # Resumable: a requeued or re-submitted job skips the shards already scored.
    score_overrides
    dcod_launch ${skip[@]+"${skip[@]}"} --log "$LOG_DIR/score.log" -- \
      "$NEMO_DCOD" score --config "$SCORE_CONFIG" "${overrides[@]}"
    ;;
  train)
    if [[ -n $STUDENT_HF && -n $STUDENT_NEMO && ! -d $STUDENT_NEMO ]]; then
      dcod_launch --single --log "$LOG_DIR/import_student.log" -- \
        "$NEMO_DCOD" import --hf "$STUDENT_HF" --out "$STUDENT_NEMO"
    fi
    train_overrides
    dcod_launch --log "$LOG_DIR/train.log" -- "$NEMO_DCOD" train --config "$TRAIN_CONFIG" "${overrides[@]}"
    ;;
  export)
    checkpoint=$(find "$RUN_ROOT/train/checkpoints" -maxdepth 1 -name '*-last' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $checkpoint ]] || { echo "export: no *-last checkpoint in $RUN_ROOT/train/checkpoints" >&2; exit 1; }
    tokenizer=()
    [[ -z $TOKENIZER ]] || tokenizer=(--tokenizer "$TOKENIZER")
    dcod_launch --single ${skip[@]+"${skip[@]}"} --log "$LOG_DIR/export.log" -- \
      "$NEMO_DCOD" export --checkpoint "$checkpoint" --hf-out "$HF_OUT" nemo_out="$NEMO_OUT" \
      ${tokenizer[@]+"${tokenizer[@]}"} --overwrite
    ;;
  eval)
    # shellcheck disable=SC2086
    dcod_launch --single ${skip[@]+"${skip[@]}"} --log "$LOG_DIR/eval.log" -- \
      "$NEMO_DCOD" eval --config "$EVAL_CONFIG" "models=[{path: $HF_OUT, label: $EVAL_LABEL}]" \
      out_dir="$EVAL_OUT" $EVAL_OVERRIDES
    ;;
  *)
    echo "DCOD_STAGE=$DCOD_STAGE: one of generate, score, train, export, eval" >&2
    exit 2
    ;;
esac
echo "[$(date -u +%FT%TZ)] stage $DCOD_STAGE: done" >&2
