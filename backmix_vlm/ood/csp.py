"""CSP (Chen et al., NeurIPS 2024): NegLabel with a conjugated semantic pool of negative labels.

NegLabel (:mod:`backmix_vlm.ood.neglabel`) mines negative labels among single WordNet words.
CSP enlarges the pool with **conjugated** labels: each adjective is joined to a superclass
noun ("{adjective} environment / space / object / scene / ..."), so the negatives describe
whole regions of image space ("snowy landscape") rather than single concepts.  As in the
authors' code (MengyuanChen21/NeurIPS2024-CSP, ``multi_modal.py`` + ``class_names.py``):

* nouns: WordNet nouns, each prompted with the eight "nice" templates (:data:`CSP_NOUN_TEMPLATES`,
  also the ID prompts of their config) and the embeddings averaged;
* conjugated labels: per adjective, **one** superclass template drawn with Python's
  ``random`` seeded ``seed`` (:func:`conjugate`), then the four adjective templates
  (:data:`CSP_ADJ_TEMPLATES`) averaged;
* lexicographer files: NegLabel's less ``noun.person``, ``noun.quantity``, ``noun.group``,
  ``adj.pert`` (:data:`backmix_vlm.data.wordnet.CSP_LEXNAMES`);
* selection: NegLabel's (0.95 quantile, lowest 15 % per kind), except that a candidate whose
  largest similarity to an ID label exceeds 0.95 is never preferred (similarity set to 1);
* score: NegLabel's grouped ID share (τ = 0.01, 100 groups).

Differences from the authors' code: the prompt ensembles average unit-norm prompt embeddings
(open_clip's zero-shot classifier; theirs average raw ``encode_text`` outputs, then
normalise), and the group permutation comes from a seeded CPU generator (theirs: CUDA).
"""
from __future__ import annotations

import random
from typing import Sequence

from torch import Tensor

from ..errors import ConfigError
from .neglabel import candidate_pool, negative_text_features
from .scores import NegLabel, ScoreSetup, _register

#: the "nice" noun templates (``preset_noun_prompt_templates``): nouns and, in the authors' config, ID classes
CSP_NOUN_TEMPLATES = (
    "a close-up photo of the nice {}.", "a photo with the nice {}.", "a good photo with the nice {}.",
    "a photo of the nice {}.", "{}", "the {}", "the good {}", "the nice {}")
#: the superclass words an adjective is conjugated with (``csp_templates``)
CSP_SUPERCLASS_TEMPLATES = (
    "{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area", "{} view",
    "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature")
#: the templates of a conjugated label (``preset_adj_prompt_templates``)
CSP_ADJ_TEMPLATES = ("{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}")


def conjugate(adjectives: Sequence[str], seed: int = 0,
              superclasses: Sequence[str] = CSP_SUPERCLASS_TEMPLATES) -> list[str]:
    """One conjugated label per adjective: ``random.Random(seed).choice(superclasses)`` in order
    (the authors' ``random.seed(seed)`` then ``random.choice`` per adjective)."""
    rng = random.Random(seed)
    return [rng.choice(list(superclasses)).format(a) for a in adjectives]


def csp_text_features(encode, pos: Tensor, nouns: Sequence[str], adjectives: Sequence[str], *,
                      noun_templates: Sequence[str] = CSP_NOUN_TEMPLATES, ratio: float = 0.15,
                      percentile: float = 0.95, exclude_above: float | None = 0.95, seed: int = 0,
                      exclude: Sequence[str] = ()) -> tuple[Tensor, list[str]]:
    """CSP's negative labels: ``(unit-norm embeddings (M', D), the selected labels)``, nouns first.

    Adjectives that are also nouns or ID class names are dropped before conjugation (as the
    authors' de-duplication), so the random superclass draws follow the kept adjectives.
    """
    banned = {w.lower() for w in exclude}
    nouns = [w for w in nouns if w.lower() not in banned]
    noun_set = set(nouns)
    adjs = [w for w in adjectives if w.lower() not in banned and w not in noun_set]
    return negative_text_features(encode, pos, nouns, noun_templates, adjectives=conjugate(adjs, seed),
                                  ratio=ratio, percentile=percentile, adj_templates=CSP_ADJ_TEMPLATES,
                                  exclude_above=exclude_above)


@_register("csp")
class CSP(NegLabel):
    """CSP (Chen et al. 2024): NegLabel's score over negatives mined from WordNet nouns and
    conjugated adjective + superclass labels (:mod:`backmix_vlm.ood.csp`).

    Defaults are the authors' ImageNet config: the CSP lexicographer files, 15 % kept at the
    0.95 quantile, near-synonyms (max ID similarity > 0.95) excluded, τ = 0.01, 100 groups,
    seed 0 for the superclass draws and the grouping.  ``words`` / ``adjectives`` files replace
    the WordNet pool; ``noun_templates`` (default the eight "nice" templates) prompt the nouns.
    """

    def __init__(self, words: str | None = None, adjectives: str | None = None, lexnames: list[str] | None = None,
                 ratio: float = 0.15, percentile: float = 0.95, exclude_above: float | None = 0.95,
                 noun_templates: list[str] | None = None, temperature: float = 0.01, ngroup: int = 100,
                 seed: int = 0) -> None:
        super().__init__(words=words, adjectives=adjectives, lexnames=lexnames, ratio=ratio, percentile=percentile,
                         temperature=temperature, ngroup=ngroup, seed=seed)
        self.exclude_above = None if exclude_above is None else float(exclude_above)
        self.noun_templates = list(noun_templates) if noun_templates is not None else list(CSP_NOUN_TEMPLATES)
        for t in self.noun_templates:
            if "{}" not in t:
                raise ConfigError(f"csp noun_templates: {t!r} has no '{{}}' for the word")

    def _setup(self, inputs: ScoreSetup) -> None:
        from ..data.wordnet import CSP_LEXNAMES

        text = inputs.text
        assert text is not None
        nouns, adjectives = candidate_pool(self.words, self.adjectives, self.lexnames, CSP_LEXNAMES,
                                           f"score_params.{self.name}")
        feats, words = csp_text_features(text.encode, text.class_features, nouns, adjectives,
                                         noun_templates=self.noun_templates, ratio=self.ratio,
                                         percentile=self.percentile, exclude_above=self.exclude_above,
                                         seed=self.seed, exclude=list(text.classnames))
        self.set_negatives(feats, words)


__all__ = ["CSP", "CSP_NOUN_TEMPLATES", "CSP_SUPERCLASS_TEMPLATES", "CSP_ADJ_TEMPLATES", "conjugate",
           "csp_text_features"]
