#!/bin/bash
# One prompt file, eight GPUs: a Slurm job array of 8 tasks with one GPU each. `--shard auto` makes task K of N
# (K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, N = SLURM_ARRAY_TASK_COUNT) take the items i with i % N == K.
# All tasks write into one shared OUT: their own images (named by item id or 6-digit index) and
# OUT/results-K-of-N.jsonl, so they never collide.
#
#   mkdir -p logs && sbatch examples/slurm-generate.sh
#   MODEL=/models/stable-diffusion-v1-5 PROMPTS=prompts.jsonl OUT=/shared/run1 sbatch examples/slurm-generate.sh
#
# Rerunning one failed task: `sbatch --array=3 ...` alone would make it shard 0 of 1 (auto reads the array it is
# in), so name its shard explicitly: SHARD=3/8 sbatch --array=3 examples/slurm-generate.sh
#
#SBATCH --job-name=pea-generate
#SBATCH --array=0-7                 # N = 8 shards (append %4 to run at most 4 at a time)
#SBATCH --gres=gpu:1                # one GPU per task
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.log  # job name, array job id, task index; logs/ must exist before sbatch
set -euo pipefail

PEA=${PEA:-pea}                                        # or .build/release/pea
MODEL=${MODEL:-$HOME/models/stable-diffusion-v1-5}     # a diffusers pipeline folder
PROMPTS=${PROMPTS:-examples/prompts.jsonl}             # .txt (one prompt a line) or .jsonl
OUT=${OUT:-$PWD/out/$SLURM_ARRAY_JOB_ID}               # the same for every task of the array
SHARD=${SHARD:-auto}

mkdir -p "$OUT"
# Slurm limits the task to its GPU through CUDA_VISIBLE_DEVICES: inside the task it is device 0.
# --seed 0: an item without its own seed gets 0 + its index in the whole file, whichever task draws it,
# so the images do not depend on the number of shards.
"$PEA" generate --model "$MODEL" --prompts "$PROMPTS" --output-dir "$OUT" --shard "$SHARD" \
    --backend cuda --device 0 --precision fp16 --batch-size 4 --seed 0 --steps 30 --guidance 7.5
