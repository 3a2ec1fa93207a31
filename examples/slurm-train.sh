#!/bin/bash
# Training one PEA adapter on several machines: 3 nodes × 8 GPUs (the authors' setup), one `pea train` process per
# GPU started by srun. The ranks train data-parallel (pea train --help, PEATrainer.swift): --batch-size is per rank,
# so the global batch is 24 × 4 = 96 here; every rank reads the same data stream and trains on its rows of each
# global batch; gradients are averaged across ranks (NCCL on the GPUs, --collective) before clipping and AdamW, so
# all hold the same adapter. Rank 0 alone writes logs, checkpoints, validation grids and the final adapter.
#
# Needs, on every node: pea, libpea_cuda.so (make cuda), NCCL's libnccl.so.2 where the loader finds it (or
# PEA_NCCL_LIB; pip install nvidia-nccl-cu12 ships one), the MPI shim built against the cluster's MPI (make mpi in
# the repository, or PEA_MPI_LIB=/path/to/libpea_mpi.so), and the model folders, the data and OUT on a filesystem
# every node sees (a resumed job reads rank 0's checkpoint on every rank).
#
#   mkdir -p logs && sbatch examples/slurm-train.sh
#   MODEL=/models/sdxl-base ENCODER=/models/chinese-clip DATA='/data/shards/{000..099}.tar' OUT=/shared/runs/zh sbatch examples/slurm-train.sh
#
# A failing or dying rank ends the whole job (it names itself on stderr and calls MPI_Abort; srun's --kill-on-bad-exit
# stops the others); checkpoints appear whole or not at all, so resubmitting with RESUME=$OUT/checkpoint-STEP
# continues the run, with this or another number of nodes (keep nodes × GPUs × --batch-size for the same global batch).
# At the time limit Slurm sends SIGTERM to every rank: they agree on it in the next all-reduce, rank 0 saves a
# checkpoint and all exit (--signal gives them 10 minutes before the limit).
#
#SBATCH --job-name=pea-train
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=8         # one rank per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0                     # all of each node's memory
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@600           # SIGTERM 10 minutes before the limit: a clean checkpoint
#SBATCH --output=logs/%x-%j.log     # logs/ must exist before sbatch
set -euo pipefail

PEA=${PEA:-pea}                                         # or .build/release/pea
MODEL=${MODEL:-$HOME/models/sdxl-base}                  # the frozen English pipeline (SD1.x/SD2.x or SDXL)
ENCODER=${ENCODER:-$HOME/models/chinese-clip}           # the language-specific text encoder
DATA=${DATA:-$HOME/data/shards/'{000..099}'.tar}         # webdataset shards or a .jsonl manifest
OUT=${OUT:-$PWD/runs/$SLURM_JOB_ID}                      # shared by all nodes
RESUME=${RESUME:-}                                      # a checkpoint folder to continue from

# Each rank takes the GPU of its rank on the node (SLURM_LOCALID, modulo the GPUs CUDA_VISIBLE_DEVICES leaves it:
# with --gpus-per-task=1 that is device 0) unless --device is given; with --gpus-per-node every task sees all of its
# node's GPUs.
srun --kill-on-bad-exit=1 --cpu-bind=cores "$PEA" train --model "$MODEL" --text-encoder "$ENCODER" --data "$DATA" \
    --output "$OUT" --steps 100000 --batch-size 4 --buckets sdxl --gradient-checkpointing \
    --backend cuda --precision fp16 --noise-offset 0.05 --save-every 1000 --collective nccl ${RESUME:+--resume "$RESUME"}
