"""Evaluation of activation communication: methods compared on the same items, a text-similarity
probe, and a (k, j) layer sweep.

Methods (one name each in the results):
  b_alone          B answers from its own prompt
  a_alone          A answers from its own prompt
  nl               natural language: A's answer (its a_alone output) is shown to B, B answers
  ac_<f>           activation communication, no aligner, f in {replace, sum, mean}
  ac_<aligner>_<f> activation communication through a fitted aligner (f from `aligner_modes`)
  skyline          B sees what A saw (SQuAD private setting only; elsewhere it equals b_alone)

Tasks: SQuAD-format QA (private: A sees context and question, B only the question; shared: both
see both), scored by exact match and F1 (official normalization); GSM8K (both see the question),
scored by the final number. Every score comes with a 95% interval (Wilson for proportions,
bootstrap for F1), and every method is compared with b_alone and nl on the same items (exact
McNemar for binary scores, paired bootstrap for all). Compute per method: tokens each model ran
(A's tokens through k of its blocks for AC), an estimate of FLOPs, and wall time.

Everything here takes loaded models (tests use tiny ones); `load_pair` and stages/evaluate.py
build them from params.

Modules: config (typed params), prompts (task texts, scoring hooks), pair (models and aligners),
methods (running and compute accounting), results (intervals, paired tests, table, chart),
similarity (the probe), sweep (the (k, j) heatmap).
"""
