"""The embedded default's own lm-eval tasks (YAML + utils.py), scored on the shipped held-out test split.

Point lm-eval's TaskManager(include_path=...) at this directory. ``tiny_synth_em``: greedy generation through the
chat template, exact match. ``tiny_synth_mc``: four-way log-likelihood choice among near-miss reversals (accuracy and
Brier score).
"""
