#!/bin/bash
# The cross-model runs of results/cross-model/ (README, "Between different models"), from the repo root,
# on this project's 2-core CPU machine (fp32, real offline weights). What was fixed before any score:
# results/cross-model/PLAN.md. Stores, maps and aligners go under $OUT (default data/cross-model).
set -e
OUT=${OUT:-data/cross-model}
export XMODEL_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
PAIR="-S models.a=smollm2-135m-instruct -S models.b=qwen2.5-coder-0.5b-instruct"
LAYERS="-S extract.layers=[0.0,0.041667,0.083333,0.125,0.166667,0.208333,0.25,0.291667,0.333333,0.375,0.416667,0.458333,0.5,0.541667,0.583333,0.625,0.666667,0.708333,0.75,0.791667,0.833333,0.875,0.916667,0.958333,1.0]"
# 1. prose stores with every layer of B (depths i/24) and A's nearest, per-token rows kept; mapped KV's maps
xmodel $PAIR $LAYERS -S paths.data=$OUT/prose extract --model a --quiet
xmodel $PAIR $LAYERS -S paths.data=$OUT/prose extract --model b --quiet
xmodel $PAIR $LAYERS -S paths.data=$OUT/prose kvmaps
# 2. the per-token prose LoRA at k -> j = 0.93 (multi-vector AC's aligner), on the same stores
mkdir -p $OUT/tok && ln -sfn ../prose/stores $OUT/tok/stores
xmodel $PAIR $LAYERS -S paths.data=$OUT/tok -S fit.kind=tokens -S fit.layers=[0.93,0.93] fit lora --quiet
# 3. the in-task LoRA: A's state on prompt_a -> B's on the skyline prompt, Countries train places
T="--params profiles/in-task.yaml $PAIR -S paths.data=$OUT/in-task -S extract.layers=[0.93] -S fit.layers=[0.93,0.93] -S evaluate.countries.places=train"
xmodel $T extract --model a --quiet && xmodel $T extract --model b --quiet && xmodel $T fit lora --quiet
# 4. the task fuser (train places; 128 items, 32 held out, 3 epochs, CPU)
xmodel $PAIR -S paths.data=$OUT/fuse -S 'fuse.variants=[task]' -S fuse.n_train=128 -S fuse.n_heldout=32 \
  -S fuse.epochs=3 -S fuse.patience=0 -S fuse.device=cpu fuse task
# 5. Countries on the evaluation places, n = 100, every method beside its mismatched control (two runs)
E="$PAIR -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S evaluate.tasks=[countries] -S evaluate.countries.places=eval -S evaluate.countries.n=100 -S evaluate.controls=[mismatched]"
xmodel $E -S paths.data=$OUT/countries -S 'evaluate.methods=[b_alone, nl, ac, mv_ac, mapped_kv, skyline]' \
  -S 'evaluate.modes=[replace, gated]' -S 'evaluate.aligner_modes=[replace, gated]' \
  -S "evaluate.aligners=[$OUT/tok/aligners/lora, $OUT/prose/aligners/kvmaps]" \
  -S 'evaluate.mv.m=[1, 4, 16, all]' -S 'evaluate.mv.aligners=[lora]' evaluate countries
xmodel $E -S paths.data=$OUT/countries-2 -S 'evaluate.methods=[b_alone, nl, ac, fuser]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace, gated]' -S "evaluate.aligners=[$OUT/in-task/aligners/lora, $OUT/fuse/fusers/task]" \
  evaluate countries
# 6. the in-task LoRA AC beside all three controls (mismatched, noise, zero)
xmodel $E -S paths.data=$OUT/countries-controls -S 'evaluate.methods=[b_alone, ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace]' -S "evaluate.aligners=[$OUT/in-task/aligners/lora]" \
  -S 'evaluate.controls=[mismatched, noise, zero]' evaluate countries
# 7. seen places: the same trained methods on the training places (new statements about them)
xmodel $E -S paths.data=$OUT/countries-seen -S evaluate.countries.places=train \
  -S 'evaluate.methods=[b_alone, ac, fuser, skyline]' -S 'evaluate.modes=[]' -S 'evaluate.aligner_modes=[replace, gated]' \
  -S "evaluate.aligners=[$OUT/in-task/aligners/lora, $OUT/fuse/fusers/task]" evaluate countries
xmodel report --methods $OUT/countries --methods $OUT/countries-2 --methods $OUT/countries-seen --methods $OUT/countries-controls --bandwidth $OUT/bandwidth.png

# --- SmolLM2 -> Qwen-0.5B, SQuAD (generated, seed 0, private setting), n = 100 (PLAN.md, stream Y) ---
S="$PAIR -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S evaluate.tasks=[squad] -S evaluate.controls=[mismatched]"
# 8. references and plain AC
xmodel $S -S paths.data=$OUT/smol-squad -S 'evaluate.methods=[b_alone, nl, ac, skyline]' -S 'evaluate.modes=[replace, gated]' \
  -S 'evaluate.aligners=[]' evaluate squad
# 9. the in-task LoRA on 256 SQuAD items of corpus seed 1 (generated passages of another seed: none shared)
T="--params profiles/in-task.yaml $PAIR -S paths.data=$OUT/in-task-squad -S extract.layers=[0.93] -S fit.layers=[0.93,0.93] -S corpus.source=task:squad -S corpus.n=256"
xmodel $T extract --model a --quiet && xmodel $T extract --model b --quiet && xmodel $T fit lora --quiet
xmodel $S -S paths.data=$OUT/smol-squad-2 -S 'evaluate.methods=[b_alone, ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace, gated]' -S "evaluate.aligners=[$OUT/in-task-squad/aligners/lora]" evaluate squad
# 10. multi-vector AC through the per-token prose LoRA (step 2) and mapped KV through the ridge maps (step 1)
xmodel $S -S paths.data=$OUT/smol-squad-3 -S 'evaluate.methods=[b_alone, mv_ac, mapped_kv]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace]' -S "evaluate.aligners=[$OUT/tok/aligners/lora, $OUT/prose/aligners/kvmaps]" \
  -S 'evaluate.mv.m=[1, 4, 16, all]' -S 'evaluate.mv.aligners=[lora]' evaluate squad

# --- Qwen-0.5B -> 1.5B, Countries evaluation places, n = 100 (PLAN.md, stream X) ---
Q="-S models.a=qwen2.5-coder-0.5b-instruct -S models.b=qwen2.5-coder-1.5b-instruct"
C="$Q -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S evaluate.tasks=[countries] -S evaluate.countries.places=eval -S evaluate.countries.n=100 -S evaluate.controls=[mismatched]"
# 11. references and plain AC (the last 896 of B's 1536 coordinates)
xmodel $C -S paths.data=$OUT/q15-countries -S 'evaluate.methods=[b_alone, nl, ac, skyline]' -S 'evaluate.modes=[replace, gated]' \
  -S 'evaluate.aligners=[]' evaluate countries
# 12. the in-task LoRA (Countries train places, corpus seed 1, 512 items)
T="--params profiles/in-task.yaml $Q -S paths.data=$OUT/q15-in-task -S extract.layers=[0.93] -S fit.layers=[0.93,0.93] -S evaluate.countries.places=train"
xmodel $T extract --model a --quiet && xmodel $T extract --model b --quiet && xmodel $T fit lora --quiet
xmodel $C -S paths.data=$OUT/q15-countries-2 -S 'evaluate.methods=[b_alone, ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace, gated]' -S "evaluate.aligners=[$OUT/q15-in-task/aligners/lora]" evaluate countries
xmodel report --methods $OUT/smol-squad --methods $OUT/smol-squad-2 --methods $OUT/smol-squad-3 \
  --methods $OUT/q15-countries --methods $OUT/q15-countries-2
# 13. avp's rows on the same items (optional dependency: pip install 'xmodel[avp]'): results/cross-model/avp/README.md

# --- A = B = Qwen-0.5B, the reference pair, Countries evaluation places, n = 100 (PLAN.md, step 6 in part) ---
R="-S models.a=qwen2.5-coder-0.5b-instruct -S models.b=qwen2.5-coder-0.5b-instruct -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S evaluate.tasks=[countries] -S evaluate.countries.places=eval -S evaluate.countries.n=100 -S evaluate.controls=[mismatched]"
# 14. references, plain AC, KV (all layers); multi-vector AC without an aligner
xmodel $R -S paths.data=$OUT/same-countries -S 'evaluate.methods=[b_alone, nl, ac, kv, skyline]' -S 'evaluate.modes=[replace]' \
  -S 'evaluate.aligners=[]' -S 'evaluate.kv.layers=[all]' evaluate countries
xmodel $R -S paths.data=$OUT/same-countries-mv -S 'evaluate.methods=[b_alone, mv_ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligners=[]' -S 'evaluate.mv.m=[1, 4, 16, all]' -S 'evaluate.mv.aligners=[none]' evaluate countries
# 15. A = B in-task LoRA (Countries train places, corpus seed 1, 512 items), f in {replace, gated}
T="--params profiles/in-task.yaml -S models.a=qwen2.5-coder-0.5b-instruct -S models.b=qwen2.5-coder-0.5b-instruct -S paths.data=$OUT/same-in-task -S extract.layers=[0.93] -S fit.layers=[0.93,0.93] -S evaluate.countries.places=train"
xmodel $T extract --model a --quiet && xmodel $T extract --model b --quiet && xmodel $T fit lora --quiet
xmodel $R -S paths.data=$OUT/same-countries-lora -S 'evaluate.methods=[b_alone, ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace, gated]' -S "evaluate.aligners=[$OUT/same-in-task/aligners/lora]" evaluate countries

# --- Qwen-0.5B -> 1.5B, Tip Sheets (generated, seed 0, n = 100), PLAN.md step 4 ---
P="$Q -S evaluate.layer_a=0.93 -S evaluate.layer_b=0.93 -S evaluate.tasks=[tipsheets] -S evaluate.controls=[mismatched]"
# 16. references and plain AC
xmodel $P -S paths.data=$OUT/q15-tipsheets -S 'evaluate.methods=[b_alone, nl, ac, skyline]' -S 'evaluate.modes=[replace]' \
  -S 'evaluate.aligners=[]' evaluate tipsheets
# 17. the in-task LoRA on 256 Tip Sheets items of corpus seed 1 (other companies)
T="--params profiles/in-task.yaml $Q -S paths.data=$OUT/q15-in-task-tips -S extract.layers=[0.93] -S fit.layers=[0.93,0.93] -S corpus.source=task:tipsheets -S corpus.n=256"
xmodel $T extract --model a --quiet && xmodel $T extract --model b --quiet && xmodel $T fit lora --quiet
xmodel $P -S paths.data=$OUT/q15-tipsheets-2 -S 'evaluate.methods=[b_alone, ac]' -S 'evaluate.modes=[]' \
  -S 'evaluate.aligner_modes=[replace]' -S "evaluate.aligners=[$OUT/q15-in-task-tips/aligners/lora]" evaluate tipsheets
