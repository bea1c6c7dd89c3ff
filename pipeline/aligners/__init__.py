"""Aligners: maps from model A's activation space into model B's, fitted from the activation store.

    from pipeline.aligners.registry import get_aligner, load_aligner
    aligner = get_aligner("procrustes")().fit(source, target)   # or "my.module:MyAligner"
    aligner.save("data/aligners/procrustes");  load_aligner("data/aligners/procrustes")

The registry (pipeline/aligners/registry.py) names them; this package's __init__ imports nothing, so
importing any aligner module never runs the others.
"""
