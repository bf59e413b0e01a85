"""What every evaluation leaves in its folder: one :func:`finish_evaluation` for all jobs.

``train``, ``fewshot`` (per seed), ``zeroshot``, ``ood`` and ``eval`` end the same way:
``results.md`` / ``results.json`` (accuracy, accuracy on extra known sets, every metric per
unknown set and score), optionally ``summary.md`` (the literature's FPR95 / AUROC table),
``scores.safetensors`` (per-sample scores, so plots never re-run the model) and
``plots/score_hist_<set>.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from ..ood.evaluate import Scored


class ScoredEvaluation(Protocol):
    """What :func:`finish_evaluation` reads from an evaluator (``ood.OpenSetEvaluator``,
    ``ood.Evaluator``) to save per-sample scores."""

    per_sample: Mapping[str, Any]
    scores: Sequence[Any]                 # Score objects (their .name)

    @property
    def unknown_names(self) -> list[str]: ...

    @property
    def positive(self) -> str: ...


def finish_evaluation(out_dir: str | Path, results: Mapping[str, Any], *, title: str,
                      evaluator: ScoredEvaluation | None = None, scored: "Scored | None" = None, epoch: int = 0,
                      summary: bool = False, plots: bool = False) -> dict[str, Any]:
    """Write an evaluation's tables, per-sample scores and score plots into ``out_dir``.

    ``results`` is ``evaluate_open_set``'s dict plus the job's own keys (model, epochs, ...);
    extra known-class sets arrive in ``results["extra_known"]`` (accuracy only) and are
    rendered with the rest.  ``evaluator`` (or the pipeline's ``scored``): save its per-sample
    scores (``scores.safetensors``, with ``epoch`` and the score / unknown-set names); ``summary``: also ``summary.md``;
    ``plots``: score histograms into ``out_dir/plots`` (needs the per-sample scores).
    Returns ``results`` as a plain dict.
    """
    from ..ood.open_set import SCORES_FILE, save_scores
    from ..atomic import atomic_write_text
    from .figures import PLOTS, score_plots
    from .tables import ood_summary_table, write_results

    out_dir = Path(out_dir)
    results = dict(results)
    write_results(out_dir, results, title=title)
    if summary:
        atomic_write_text(out_dir / "summary.md", f"# {title}\n\n" + ood_summary_table(results))
    if scored is not None:
        per_sample, meta = scored.per_sample(), {"scores": list(scored.set_score_names),
                                                 "unknown_sets": scored.unknown_names, "positive": scored.positive}
    elif evaluator is not None:
        per_sample, meta = evaluator.per_sample, {"scores": [s.name for s in evaluator.scores],
                                                  "unknown_sets": list(evaluator.unknown_names),
                                                  "positive": evaluator.positive}
    else:
        per_sample, meta = {}, {}
    if per_sample:
        save_scores(out_dir / SCORES_FILE, per_sample, {**meta, "epoch": epoch})
        if plots:
            score_plots(out_dir, out_dir / PLOTS)
    return results
