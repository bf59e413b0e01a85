"""Open-set / OOD evaluation: scores (registry), metrics, cached features, evaluation.

The final linear layer the head-based scores re-run (``LinearHead``, ``find_linear_head``,
``fit_linear_probe``) is a model concern: :mod:`backmix_vlm.models.heads`.
"""
from .evaluate import evaluate_open_set, results_to_rows
from .evaluator import Evaluator
from .features import cache_file, cache_key, extract_outputs, model_fingerprint, score_images_loader
from .metrics import MetricInputError, ood_metrics
from .open_set import OpenSetEvaluator, load_scores, save_scores
from .scores import SCORES, Score, get_score

__all__ = [
    "SCORES", "Score", "get_score", "ood_metrics", "MetricInputError", "extract_outputs",
    "score_images_loader", "cache_key", "cache_file", "model_fingerprint", "evaluate_open_set",
    "results_to_rows", "Evaluator", "OpenSetEvaluator", "save_scores", "load_scores",
]
