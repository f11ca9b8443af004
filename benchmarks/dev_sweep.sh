#!/usr/bin/env bash
# Choose the fine-tuning defaults on ONE development task (button-press-topdown-v3 from state),
# with the same budget for NCDPO and DPPO: 3 x 2 grid points x 2 seeds, 100k env steps each,
# from the task's pre-trained checkpoint (benchmarks/manipulation.py makes it). Resumable:
# rerun with RESUME=--resume. Sampling in the trial's process (env_runners=0): a Tune trial
# with 2 remote EnvRunners asks for 3 CPUs. docs/benchmarks.md ("dev-sweep") has the result.
set -euo pipefail
cd "$(dirname "$0")/.."
NCDPO=${NCDPO:-.venv/bin/ncdpo}
PRE=${PRE:-runs/bench/metaworld-button_press-state/pretrain/pretrained}
STEPS=${STEPS:-100000}
COMMON=(--seeds 0 1 --set "init_from=$PRE" --set "stop.env_steps=$STEPS" --set resources.env_runners=0
        --set resources.envs_per_runner=4 --set tracking.experiment=dev-sweep-button-press
        --set checkpoint.dir=runs/dev-sweep ${RESUME:-})
case "${1:-all}" in
  ncdpo|all)
    $NCDPO sweep configs/metaworld_button_press.yaml configs/recipes/ncdpo_finetune.yaml --name ncdpo \
      --grid ppo.lr=3e-6,1e-5,3e-5 --grid ppo.target_kl=0.01,0.05 "${COMMON[@]}" ;;&
  dppo|all)
    $NCDPO sweep configs/metaworld_button_press.yaml configs/recipes/dppo_reference.yaml --name dppo \
      --grid ppo.lr=3e-5,1e-4,3e-4 --grid ppo.clip_param=0.01,0.1 "${COMMON[@]}" ;;
esac
