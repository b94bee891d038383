#!/usr/bin/env bash
# Run nemo-dcod stages on a Slurm allocation: one task per device on every node, through srun.
#
# In an sbatch script (the way slurm/*.sh use it):
#   source launchers/slurm.sh
#   dcod_launch [--single] [--log FILE] [--skip-missing] -- COMMAND [ARGS...]
# or as the batch script's last command:  exec launchers/slurm.sh [options] -- COMMAND [ARGS...]
#
# No training logic: it turns the allocation into ranks the way Lightning expects, and turns
# Slurm's preemption signal into a checkpoint, an exit and a requeue.
#
# * Ranks: `srun --ntasks-per-node=$SLURM_NTASKS_PER_NODE` on all $SLURM_JOB_NUM_NODES nodes.
#   Each task runs COMMAND itself (no wrapper shell). Lightning's SLURMEnvironment reads
#   SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID (the local rank picks the GPU); for
#   `nemo-dcod train` and `score` this appends `trainer.devices=<tasks per node>
#   trainer.num_nodes=<nodes>`, which Lightning checks against the same variables.
# * Rendezvous: MASTER_ADDR is the first host of $SLURM_JOB_NODELIST (`scontrol show hostnames`),
#   MASTER_PORT 15000 + the job id's last 4 digits (Lightning's own rule, so both agree); either
#   can be preset. torch.distributed uses NCCL on GPUs, gloo on CPU.
# * --single: one task on the first node (prepare, export, eval); no trainer.* overrides.
# * Container: when CONTAINER_IMAGE is set, srun runs the tasks in it through pyxis
#   (--container-image, --container-mounts=$CONTAINER_MOUNTS, --container-workdir=$PWD).
# * --log FILE: the step's output (all ranks, each line prefixed with its rank) is appended to FILE.
# * --skip-missing: a stage this nemo-dcod does not have yet (it exits 2 with "not implemented
#   yet", which the step's log shows; needs --log) is logged as skipped and counts as a success.
#
# Preemption (why it is split this way: launchers/README.md):
#   1. The job is submitted with `--signal=B:USR1@<seconds>` (or an operator runs
#      `scancel --batch --signal=USR1 <job>`): Slurm signals the batch shell only, which runs
#      this code. Not the plain `--signal=USR1`: that signals every process of the job steps,
#      and the helper processes Megatron's checkpoint writer spawns die of it.
#   2. The trap below forwards USR1 to rank 0 of the running training step alone (its pid from
#      `scontrol listpids`, on this node: the batch host runs rank 0). NeMo's PreemptionCallback
#      on rank 0 broadcasts the stop; every rank saves a NeMo checkpoint at the end of the step
#      and exits with $NEMO_DCOD_PREEMPT_EXIT_CODE, set here to 75 (EX_TEMPFAIL).
#   3. On exit 75 (or any failure of a step after the signal) this runs
#      `scontrol requeue $SLURM_JOB_ID` on the host (so ranks in a container need no Slurm
#      client) and ends the script with 75. The requeued job runs the batch script again and
#      training resumes from the newest complete checkpoint (`resume=true`, the default).
#   A signal between steps, or during a single-task step, is remembered: the job is requeued
#   before the next step starts. If the batch shell gets SIGTERM (scancel, time limit, an
#   operator's `scontrol requeue`), Slurm is ending the job itself: the ranks get SIGTERM too and
#   save (NeMo's SIGTERM callback); this waits for them, requeues nothing and starts no new step.
#
# dcod_launch returns the command's exit status (0 for a skipped stage); after a preemption or a
# SIGTERM it ends the batch script (exit 75 / 143).

_DCOD_PREEMPTED=75
_dcod_preempt_requested=0
_dcod_term=0
_dcod_step_pid=""
_dcod_step_preemptible=0
_dcod_forwarded=0

_dcod_say() { echo "[$(date -u +%FT%TZ)] launcher: $*" >&2; }

# Rank 0's pid on this node: the task with global id 0 of the newest numbered step of this job.
_dcod_rank0_pid() {
  scontrol listpids "$SLURM_JOB_ID" 2>/dev/null |
    awk '$3 ~ /^[0-9]+$/ && $5 == "0" { print $3, $1 }' | sort -n | tail -n 1 | cut -d' ' -f2
}

_dcod_forward_usr1() {
  local pid="" try
  for ((try = 0; try < 30; try++)); do # the step may be starting: rank 0 appears within seconds
    pid=$(_dcod_rank0_pid)
    [[ -n $pid ]] && break
    kill -0 "$_dcod_step_pid" 2>/dev/null || return 0
    sleep 1
  done
  if [[ -n $pid ]] && kill -USR1 "$pid" 2>/dev/null; then
    _dcod_forwarded=1
    _dcod_say "SIGUSR1 (preemption): forwarded to rank 0 (pid $pid); the ranks save a checkpoint at the end of the step"
  else
    _dcod_say "SIGUSR1 (preemption): rank 0 not found on this node ('scontrol listpids $SLURM_JOB_ID'); the step runs on, the job is requeued after it"
  fi
}

_dcod_on_usr1() {
  _dcod_preempt_requested=1
  if [[ -n $_dcod_step_pid ]] && ((_dcod_step_preemptible && !_dcod_forwarded)); then
    _dcod_forward_usr1
  else
    _dcod_say "SIGUSR1 (preemption): noted; the job is requeued before its next step"
  fi
}

_dcod_on_term() {
  _dcod_term=1
  _dcod_say "SIGTERM: Slurm is ending the job; waiting for the ranks to save and exit"
}

_dcod_requeue_and_exit() {
  if ((_dcod_term)); then
    _dcod_say "$1; Slurm is ending the job (SIGTERM): not requeueing"
  elif scontrol requeue "$SLURM_JOB_ID"; then
    _dcod_say "$1; job $SLURM_JOB_ID requeued: it runs this script again and resumes from the newest complete checkpoint"
  else
    _dcod_say "$1; 'scontrol requeue $SLURM_JOB_ID' failed (was the job submitted with --requeue?): resubmit to resume"
  fi
  exit "$_DCOD_PREEMPTED"
}

dcod_launch() {
  local single=0 log="" skip_missing=0
  while (($#)); do
    case $1 in
      --single) single=1 ;;
      --log) log=${2:?--log needs a file}; shift ;;
      --skip-missing) skip_missing=1 ;;
      --) shift; break ;;
      -*) echo "dcod_launch: unknown option $1" >&2; return 2 ;;
      *) break ;;
    esac
    shift
  done
  if (($# == 0)); then
    echo "usage: dcod_launch [--single] [--log FILE] [--skip-missing] [--] COMMAND [ARGS...]" >&2
    return 2
  fi
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "dcod_launch: not inside a Slurm allocation (SLURM_JOB_ID is unset): call it from an sbatch script or salloc." >&2
    return 2
  fi
  if ((skip_missing)) && [[ -z $log ]]; then
    echo "dcod_launch: --skip-missing reads the step's log: give --log FILE." >&2
    return 2
  fi
  ((_dcod_term)) && exit 143
  ((_dcod_preempt_requested)) && _dcod_requeue_and_exit "preemption requested before '$1 ${2:-}'"

  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
  export NEMO_DCOD_PREEMPT_EXIT_CODE=$_DCOD_PREEMPTED

  local nodes=${SLURM_JOB_NUM_NODES:-${#hosts[@]}} tasks_per_node
  if ((single)); then
    nodes=1 tasks_per_node=1
  else
    tasks_per_node=${SLURM_NTASKS_PER_NODE:-}
    if [[ -z $tasks_per_node ]]; then
      echo "dcod_launch: SLURM_NTASKS_PER_NODE is unset: submit with --ntasks-per-node=<devices per node>." >&2
      return 2
    fi
  fi

  local -a cmd=("$@") srun_args
  local i
  # `nemo-dcod train|score`: the processes srun starts are the trainer's devices (Lightning checks).
  for ((i = 0; i < ${#cmd[@]} - 1; i++)); do
    if ((!single)) && [[ $(basename -- "${cmd[i]}") == nemo-dcod && ${cmd[i + 1]} =~ ^(train|score)$ ]]; then
      cmd+=("trainer.devices=$tasks_per_node" "trainer.num_nodes=$nodes")
      break
    fi
  done

  srun_args=(--nodes="$nodes" --ntasks="$((nodes * tasks_per_node))" --ntasks-per-node="$tasks_per_node"
    --kill-on-bad-exit=1 --label)
  ((single)) && srun_args+=(--nodelist="${hosts[0]}")
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD")
    [[ -z ${CONTAINER_MOUNTS:-} ]] || srun_args+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  if [[ -n $log ]]; then
    mkdir -p "$(dirname -- "$log")"
    srun_args+=(--output="$log" --error="$log" --open-mode=append)
  fi

  _dcod_say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $tasks_per_node task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT${log:+, log $log}"
  _dcod_say "srun ${srun_args[*]} ${cmd[*]}"
  # In the background, so that the traps run while the ranks work (bash runs a trap only once
  # the foreground command has finished, but `wait` returns on a trapped signal at once).
  srun "${srun_args[@]}" "${cmd[@]}" &
  _dcod_step_pid=$!
  _dcod_step_preemptible=$((!single))
  _dcod_forwarded=0
  local rc=0
  while :; do
    wait "$_dcod_step_pid" && rc=0 || rc=$?
    kill -0 "$_dcod_step_pid" 2>/dev/null || break # still running: a trap interrupted `wait`
  done
  _dcod_step_pid=""

  # Exit 2 from the CLI; 143 on the other ranks of a multi-rank step, which srun then ends.
  if ((rc != 0 && skip_missing)) && tail -n 40 "$log" | grep -q "not implemented yet"; then
    _dcod_say "skipped: '${cmd[*]}' is not implemented yet in this nemo-dcod"
    rc=0
  fi
  if ((rc == _DCOD_PREEMPTED || (_dcod_preempt_requested && rc != 0))); then
    _dcod_requeue_and_exit "preempted (step exit status $rc): the ranks saved a checkpoint"
  fi
  ((_dcod_term)) && { _dcod_say "step ended with status $rc after SIGTERM"; exit 143; }
  if ((rc == 0)); then _dcod_say "done"; else _dcod_say "failed with exit status $rc"; fi
  return "$rc"
}

# Sourced by the batch shell, or running as it (exec): the traps must live in that process,
# because `--signal=B:USR1@<s>` and `scancel --batch` signal the batch shell alone.
trap _dcod_on_usr1 USR1
trap _dcod_on_term TERM

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  dcod_launch "$@"
fi
