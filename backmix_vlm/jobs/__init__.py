"""Each job's typed config and what it builds from it, shared by the runners.

``jobs/<job>.py`` holds the YAML schema of ``backmix-vlm <job>`` (dataclasses, checked by
``from_dict``), its loader, its ``preflight`` (data, model name, scores: checked before a run
folder exists) and the small builders the job's runners share (datasets, backbone, model, a
run's saved config); ``jobs/runs.py`` is every job's run folder (plan, lock, records, resume).
``runners/<job>.py`` runs the job; ``eval`` and ``visualize`` re-open train / fewshot runs through
these modules, so no runner imports another.

Layer: above data / augment / models / adapters / engine / ood / report, below runners.
"""
