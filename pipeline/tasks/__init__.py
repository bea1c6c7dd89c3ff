"""Evaluation tasks: SQuAD-format reading comprehension and GSM8K maths, with their scoring.

    from pipeline.tasks.squad import load_squad      # hub, local v1.1 JSON, or our seeded generator
    from pipeline.tasks.gsm8k import load_gsm8k      # hub, local jsonl, or reasoning-gym gsm_symbolic
    from pipeline.tasks.scoring import squad_scores, gsm8k_correct
"""
