"""Open-set / OOD evaluation: scores (registry), metrics, cached features, one scoring pipeline.

The final linear layer the head-based scores re-run (``LinearHead``, ``find_linear_head``,
``fit_linear_probe``) is a model concern: :mod:`backmix_vlm.models.heads`.
"""
from .evaluate import Scored, evaluate_open_set, results_to_rows, score_outputs
from .evaluator import Evaluator
from .features import cache_file, cache_key, extract_outputs, image_scores_loader, model_fingerprint
from .metrics import MetricInputError, ood_metrics
from .open_set import OpenSetEvaluator, load_scores, save_scores
from .pipeline import ScoringPipeline
from .scores import SCORES, Score, ScoreSetup, TextSide, build_scores, get_score
from . import posthoc  # noqa: F401,E402  (registers the post-hoc detectors in SCORES)
from . import adaneg, csp  # noqa: E402,F401  (registers the CLIP negative-label scores beyond NegLabel)

__all__ = [
    "SCORES", "Score", "ScoreSetup", "TextSide", "get_score", "build_scores", "ood_metrics", "MetricInputError",
    "extract_outputs", "image_scores_loader", "cache_key", "cache_file", "model_fingerprint", "ScoringPipeline",
    "Scored", "score_outputs", "evaluate_open_set", "results_to_rows", "Evaluator", "OpenSetEvaluator",
    "save_scores", "load_scores",
]
