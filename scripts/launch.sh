#!/usr/bin/env bash
# Starts one process per rank on this node, torchrun-style:
#   scripts/launch.sh --nproc-per-node 4 -- build/bin/dsopen-train --config configs/tiny.yaml --set parallel.strategy=zero2
#   scripts/launch.sh --nnodes 2 --node-rank 0 --master-addr host0 --master-port 29500 --nproc-per-node 8 -- ...
#
# Each process gets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE (torchrun's names);
# its output lines are prefixed with "[rank R]". SIGINT/SIGTERM are forwarded to every rank (dsopen-train then
# checkpoints and exits 0; a second signal kills). When a rank exits non-zero or dies, the others get SIGTERM, then
# SIGKILL after --grace-s seconds, and the launcher exits with the first failing rank's code.
# Under Slurm, run `srun ... dsopen-train` directly: it reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
set -uo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "options: --nproc-per-node N (1)  --nnodes M (1)  --node-rank R (0)  --master-addr A (127.0.0.1)"
  echo "         --master-port P (29500)  --grace-s S (10)  --no-prefix"
}

nproc_per_node=1 nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29500 grace_s=10 prefix=1
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "launch.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node) need_value "$@"; nproc_per_node=$2; shift 2 ;;
    --nnodes) need_value "$@"; nnodes=$2; shift 2 ;;
    --node-rank) need_value "$@"; node_rank=$2; shift 2 ;;
    --master-addr) need_value "$@"; master_addr=$2; shift 2 ;;
    --master-port) need_value "$@"; master_port=$2; shift 2 ;;
    --grace-s) need_value "$@"; grace_s=$2; shift 2 ;;
    --no-prefix) prefix=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option '$1'; the command goes after --" >&2; exit 2 ;;
  esac
done
for v in nproc_per_node nnodes grace_s master_port; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --${v//_/-} must be a positive integer, got '${!v}'" >&2; exit 2; }
done
[[ $node_rank =~ ^[0-9]+$ && $node_rank -lt $nnodes ]] ||
  { echo "launch.sh: --node-rank must be in [0, $nnodes), got '$node_rank'" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch.sh: no command given; usage: launch.sh [options] -- dsopen-train ..." >&2; exit 2; }

world=$((nnodes * nproc_per_node))
pids=()
declare -A rank_of live  # pid -> rank; pids still running
for ((i = 0; i < nproc_per_node; i++)); do
  rank=$((node_rank * nproc_per_node + i))
  if [[ $prefix == 1 ]]; then
    MASTER_ADDR=$master_addr MASTER_PORT=$master_port WORLD_SIZE=$world RANK=$rank LOCAL_RANK=$i \
      LOCAL_WORLD_SIZE=$nproc_per_node "$@" > >(sed -u "s/^/[rank $rank] /") 2> >(sed -u "s/^/[rank $rank] /" >&2) &
  else
    MASTER_ADDR=$master_addr MASTER_PORT=$master_port WORLD_SIZE=$world RANK=$rank LOCAL_RANK=$i \
      LOCAL_WORLD_SIZE=$nproc_per_node "$@" &
  fi
  pids+=($!)
  rank_of[$!]=$rank
  live[$!]=1
done

signal_all() { local p; for p in "${pids[@]}"; do kill "-$1" "$p" 2>/dev/null; done; }

signals=0
on_signal() {
  signals=$((signals + 1))
  if [[ $signals -eq 1 ]]; then
    echo "launch.sh: forwarding $1 to ${#pids[@]} rank(s); send it again to kill them" >&2
    signal_all TERM
  else
    signal_all KILL
  fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

exit_code=0
# Poll rather than `wait -n`: a rank that exits before the launcher waits must still be seen, and signals must be
# handled promptly (the trap runs between the short sleeps).
while [[ ${#live[@]} -gt 0 ]]; do
  failed_rank="" failed_status=0
  for pid in "${!live[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    status=$?
    unset "live[$pid]"
    # A dead peer fails the others' collectives within milliseconds, so one pass may find several ranks gone:
    # the one killed by a signal (status > 128) is the cause rather than those whose collective then failed.
    if [[ $status -ne 0 && $exit_code -eq 0 ]] &&
       [[ -z "$failed_rank" || ( $status -gt 128 && $failed_status -le 128 ) ]]; then
      failed_rank=${rank_of[$pid]} failed_status=$status
    fi
  done
  if [[ -n "$failed_rank" ]]; then
    exit_code=$failed_status
    echo "launch.sh: rank $failed_rank exited with code $failed_status; stopping the other ranks" >&2
    signal_all TERM
    # A watchdog escalates to SIGKILL when ranks hang in a collective with the dead peer. Its output goes
    # nowhere so that its sleep cannot keep the launcher's stdout open.
    ( sleep "$grace_s"; for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done ) > /dev/null 2>&1 &
    watchdog=$!
  fi
  [[ ${#live[@]} -gt 0 ]] && sleep 0.2
done
[[ -n "${watchdog:-}" ]] && kill "$watchdog" 2>/dev/null
wait 2>/dev/null  # the output prefixers
exit "$exit_code"
