#!/bin/bash
# One TeNeRV run per clip on a SLURM cluster: task i of the array encodes the i-th entry of clips/
# (a folder of frames, a .yuv or a .y4m) into runs/corpus/<its name>/, a self-contained run folder.
# A task that is requeued or submitted again resumes its checkpoint. From the repository root:
#     mkdir -p runs/corpus && sbatch --array=0-$(( $(ls clips | wc -l) - 1 )) docs/slurm_corpus.sh
#SBATCH --job-name=tenerv
#SBATCH --array=0-99
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=runs/corpus/slurm-%A_%a.out
set -eu
clips=(clips/*)
clip=${clips[$SLURM_ARRAY_TASK_ID]}
out=runs/corpus/$(basename "$clip")
python tenerv.py --frames "$clip" --params 0.3M --out "$out" $(test -f "$out/ckpt.pt" && echo --resume)
