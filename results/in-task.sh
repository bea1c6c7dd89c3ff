#!/bin/bash
# The in-task aligner runs of results/in-task-*/ (README, "In-task aligners"), from the repo root:
#   results/in-task.sh qwen2.5-coder-0.5b-instruct data/in-task            # in-task-same05 (A = B)
#   results/in-task.sh qwen2.5-coder-1.5b-instruct data/in-task-q05to15    # in-task-q05to15
# A = Qwen2.5-Coder-0.5B at depth 0.93 (layer 22); B = $1 at depth 0.93; stores and aligners in $2,
# the evaluation of Countries through them in $2-eval.
set -e
B=${1:?B model spec}; DATA=${2:?data dir}
export XMODEL_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
X="xmodel -S models.a=qwen2.5-coder-0.5b-instruct -S models.b=$B -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S fit.layers=[0.93,0.93] -S extract.layers=[0.93]"
T="--params profiles/in-task.yaml -S paths.data=$DATA"
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*"; }
t $X $T extract --model a --quiet
t $X $T extract --model b --quiet
t $X $T fit lora --quiet
t $X $T fit procrustes --quiet
cat "$DATA/details/fit-lora.json" "$DATA/details/fit-procrustes.json"
t $X -S "paths.data=$DATA-eval" -S "evaluate.aligners=[$DATA/aligners/lora, $DATA/aligners/procrustes]" \
  -S 'evaluate.methods=[b_alone, ac, skyline]' -S 'evaluate.modes=[replace]' evaluate countries
echo DONE
