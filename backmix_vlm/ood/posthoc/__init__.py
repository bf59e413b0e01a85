"""Post-hoc detectors beyond the core set (OpenOOD v1.5's rows), registered in :data:`~backmix_vlm.ood.scores.SCORES`.

Each is a :class:`~backmix_vlm.ood.scores.Score` with the same ``setup`` / ``postprocess``
interface; importing this package registers them.  Grouped by what they read:

* :mod:`.logit`: entropy, tempscale, klm (logits; KL-Matching and fitted temperature use the
  training logits);
* :mod:`.shaping`: scale, dice (re-run the final layer on shaped features / sparsified weights);
* :mod:`.head`: fdbd, gradnorm (closed forms over the final layer's weights);
* :mod:`.class_stats`: rmds, she, nnguide (statistics of the training features);
* :mod:`.openmax`: openmax (Weibull fits of training logit distances, libmr's ``FitHigh`` restated);
* :mod:`.rankfeat`: rankfeat (runs the model: needs its last feature map).

Defaults and where we differ from the reference code: ``docs/methods.md``.
"""
from . import class_stats, head, logit, openmax, rankfeat, shaping  # noqa: F401  (registers the scores)
