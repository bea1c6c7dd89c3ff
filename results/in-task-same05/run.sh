#!/bin/bash
set -e
. /work/main/.venv/bin/activate
export XMODEL_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# A = B = Qwen2.5-Coder-0.5B at k = j = 0.93 (22 of 24), the lead's same05 setting
X="xmodel -S models.a=qwen2.5-coder-0.5b-instruct -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S fit.layers=[0.93,0.93] -S extract.layers=[0.93]"
T="--params /work/main/profiles/in-task.yaml"
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*"; }
t $X $T extract --model a --quiet
t $X $T extract --model b --quiet
t $X $T fit lora --quiet
t $X $T fit procrustes --quiet
cat data/in-task/details/fit-lora.json data/in-task/details/fit-procrustes.json
t $X -S 'evaluate.aligners=[data/in-task/aligners/lora, data/in-task/aligners/procrustes]' -S 'evaluate.methods=[b_alone, ac, skyline]' evaluate countries
echo DONE
