#!/bin/bash
set -e
. /work/main/.venv/bin/activate
export XMODEL_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# A = Qwen2.5-Coder-0.5B (k = 22) -> B = Qwen2.5-Coder-1.5B (j = 26), depth 0.93 on both sides
X="xmodel -S models.a=qwen2.5-coder-0.5b-instruct -S models.b=qwen2.5-coder-1.5b-instruct -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S fit.layers=[0.93,0.93] -S extract.layers=[0.93]"
T="--params /work/main/profiles/in-task.yaml -S paths.data=data/in-task-q05to15"
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*"; }
t $X $T extract --model a --quiet
t $X $T extract --model b --quiet
t $X $T fit lora --quiet
t $X $T fit procrustes --quiet
cat data/in-task-q05to15/details/fit-lora.json data/in-task-q05to15/details/fit-procrustes.json
t $X -S paths.data=data/in-task-q05to15-eval -S 'evaluate.aligners=[data/in-task-q05to15/aligners/lora, data/in-task-q05to15/aligners/procrustes]' -S 'evaluate.methods=[b_alone, ac, skyline]' -S 'evaluate.modes=[replace]' evaluate countries
echo DONE
