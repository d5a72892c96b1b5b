#!/bin/bash
# SFRS training under Slurm: one torchrun agent per node, c10d rendezvous on the first node.
#
#   sbatch launch/slurm_train.sh CONFIG [--set section.key=value ...]
#   sbatch --nodes 4 --gpus-per-node 8 launch/slurm_train.sh configs/pitts30k_sfrs.yaml \
#       --set run.out_dir=/shared/runs/pitts30k_sfrs --set data.shards=/shared/shards/pitts30k
#
# Submit from the repository root (or set SFRS_REPO). The run directory and the shards must be
# on a filesystem every node sees. Environment knobs:
#   GPUS          processes per node (default: $SLURM_GPUS_ON_NODE, else 1 on CPU nodes)
#   RDZV_PORT     rendezvous port on the first node (default 29500)
#   MAX_RESTARTS  torchrun --max-restarts: times a failed worker group is restarted (default 3);
#                 restarted workers resume from the newest checkpoint (run.resume=auto)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its workers to stop after forwarding a signal
#                 (default 90; keep it above run.stop_grace_s, 60 by default)
#   SFRS_STOP_FILE  where the ranks record a stop on a signal (default: slurm-sfrs-<job id>.stop.json
#                 in the repository, a folder every node sees)
#
# Preemption and time limit: Slurm sends SIGUSR1 180 s before the time limit (--signal below)
# and SIGTERM at preemption; torchrun forwards either to its workers, which stop at the next
# step boundary, save their position, record the stop in SFRS_STOP_FILE and exit with code 75.
# This script then requeues the job (scontrol requeue; --requeue below) and the requeued job
# continues from the saved position (docs/cluster.md).
#   SFRS_PYTHON   interpreter (default: <repo>/.venv/bin/python, made by `source launch/env.sh`)
#   OMP_NUM_THREADS  threads per process (default: the task's CPUs divided by GPUS)
#
#SBATCH --job-name=sfrs
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch launch/slurm_train.sh CONFIG [--set section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

REPO=${SFRS_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${SFRS_PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "no Python interpreter at $PYTHON: run 'source launch/env.sh' once on the login node, or set SFRS_PYTHON" >&2
    exit 2
fi
if [ ! -f "$REPO/launch/train.py" ]; then
    echo "$REPO is not the sfrs_dist repository: submit from its root or set SFRS_REPO" >&2
    exit 2
fi

GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_PORT=${RDZV_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
STOP_EXIT_CODE=75
export SFRS_STOP_FILE=${SFRS_STOP_FILE:-$REPO/slurm-sfrs-$SLURM_JOB_ID.stop.json}
rm -f "$SFRS_STOP_FILE"  # a requeued job keeps its id: only this run's stop counts
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#NODES[@]}" -eq 0 ]; then
    echo "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host" >&2
    exit 2
fi
HEAD=${NODES[0]}

CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without it the step's
# task (torchrun and every rank and DataLoader worker under it) is bound to one core.
SRUN_CPUS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    SRUN_CPUS=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / GPUS > 0 ? CPUS / GPUS : 1 ))}
export PYTHONUNBUFFERED=1
cd "$REPO"
echo "sfrs: $SLURM_NNODES node(s) x $GPUS process(es), rendezvous $HEAD:$RDZV_PORT, config $CONFIG" >&2

# The batch shell outlives the step's signals (a trapped signal only interrupts `wait`), so it
# can requeue the job once the ranks have saved their position.
SIGNALLED=""
trap 'SIGNALLED=USR1; echo "sfrs: SIGUSR1 (time limit ahead): the ranks stop at the next step" >&2' USR1
trap 'SIGNALLED=TERM; echo "sfrs: SIGTERM: the ranks stop at the next step" >&2' TERM
srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 ${SRUN_CPUS[@]+"${SRUN_CPUS[@]}"} --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD:$RDZV_PORT" \
    --rdzv_id "sfrs-$SLURM_JOB_ID" \
    --max-restarts "$MAX_RESTARTS" \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    "$REPO/launch/train.py" --config "$CONFIG" "$@" &
STEP=$!
while :; do
    set +e
    wait "$STEP"
    RC=$?
    set -e
    kill -0 "$STEP" 2>/dev/null || break  # still running: a trapped signal interrupted the wait
done
# torchrun exits 1 after forwarding a signal: the ranks' exit code comes from their record
if [ -f "$SFRS_STOP_FILE" ] && grep -q "\"exit_code\": $STOP_EXIT_CODE" "$SFRS_STOP_FILE"; then
    echo "sfrs: stopped with its position saved ($(cat "$SFRS_STOP_FILE")); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ -n "$SIGNALLED" ]; then
    # a rank ran out of grace before it could save: the job resumes from its last checkpoint
    echo "sfrs: SIG$SIGNALLED and no saved position (step exit code $RC); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$RC"
