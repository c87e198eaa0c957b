"""One training label per item from the annotations of several annotators, with its quality.

How annotations are read:
    * Every annotation is one annotator's set of taxonomy paths for one item. A path that is a prefix of
      another path of the same annotation is dropped (``[["A"], ["A", "B"]]`` means ``A/B``).
    * A *prefix* annotation (``["A"]`` in a deeper tree) is a vote at level 0 only; it says nothing below.
    * A *multi-path* annotation (``[["A", "B"], ["C"]]``) splits one vote evenly between its paths: the
      heads learn one path per item, so several paths are read as the annotator's uncertainty.
    * An annotation with no paths (cancelled, empty, or only labels that left the config) gives no vote;
      an item that has nothing else is reported as excluded with the reason.

How the consensus is found (see :mod:`model.crowd`): per taxonomy level, Dawid–Skene EM estimates a
confusion matrix per annotator and a posterior over the true class per item, with the model's
out-of-sample level probabilities as one more annotator when given. The level posteriors are then
decoded jointly over the taxonomy's full paths (path score = sum of level log-posteriors, so every
consensus path is a child under its parent) and cut at the deepest level any annotator labelled.

Ground-truth annotations (then reviewed ones) take precedence when the policy says so: the consensus of
such an item is the vote among those annotations alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from model.crowd import CrowdConfig, CrowdFit, Observations, fit_crowd
from model.errors import ConfigError, TaxonomyError
from model.taxonomy import IGNORE, Path, Taxonomy

_CHUNK = 1024  # items per block when scoring full paths: (chunk, P) floats

@dataclass(frozen=True)
class Annotation:
    """One annotator's labels for one item.

    Attributes:
        item: the item (Label Studio task id).
        annotator: who labelled (e.g. the Label Studio user id as a string).
        paths: taxonomy paths given (names or Choice values); empty when the annotation holds no label.
        ground_truth: marked as ground truth in Label Studio.
        reviewed: accepted by a reviewer.
    """

    item: int
    annotator: str
    paths: tuple[tuple[str, ...], ...]
    ground_truth: bool = False
    reviewed: bool = False


@dataclass(frozen=True)
class ConsensusPolicy:
    """Which consensus labels training may use.

    Attributes:
        min_annotators: annotators with a label an item needs (ground truth / reviewed items excepted).
        min_agreement: fraction of an item's annotators whose label agrees with the consensus path.
        prefer_ground_truth: ground-truth, then reviewed annotations decide their items alone.
        exclude_flagged: keep items with a blocking flag (see ``model.disagreement.BLOCKING``) out of training
            until a ground-truth or reviewed annotation resolves them.
        min_quality: a consensus whose estimated probability of being right is below this is flagged as
            low quality.
        error_threshold: an annotation whose probability of being right is below this, and that the model
            contradicts, is a label-error candidate.
        model_confidence: the model "confidently contradicts" a label when it gives that label at most
            ``1 - model_confidence``.
    """

    min_annotators: int = 1
    min_agreement: float = 0.0
    prefer_ground_truth: bool = True
    exclude_flagged: bool = True
    min_quality: float = 0.6
    error_threshold: float = 0.5
    model_confidence: float = 0.7

    def validate(self) -> None:
        """Raises ConfigError naming the bad field and its valid range."""
        if self.min_annotators < 1:
            raise ConfigError(f"min_annotators={self.min_annotators}: set CONSENSUS_MIN_ANNOTATORS to 1 or more.")
        for name in ("min_agreement", "min_quality", "error_threshold", "model_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value}: the consensus policy needs a fraction in [0, 1].")


class Source(str, enum.Enum):
    """Where an item's consensus comes from."""

    CROWD = "crowd"
    GROUND_TRUTH = "ground_truth"
    REVIEWED = "reviewed"
    NONE = "none"


@dataclass(frozen=True)
class GivenLabel:
    """One annotator's label on one item, with how likely it is right.

    Attributes:
        annotator: who gave it.
        paths: the canonical paths given (deepest only).
        quality: estimated probability that the label is right (path posterior mass under its paths).
        model_prob: the model's probability of the same paths, or None without a model.
        first_wrong_level: first level where it differs from the consensus, or None.
        ground_truth: the annotation is marked ground truth.
        reviewed: the annotation was accepted by a reviewer.
    """

    annotator: str
    paths: tuple[Path, ...]
    quality: float
    model_prob: float | None
    first_wrong_level: int | None
    ground_truth: bool = False
    reviewed: bool = False


@dataclass(frozen=True)
class ItemConsensus:
    """Everything known about one item's labels.

    Attributes:
        item: the item id.
        path: the consensus path (a valid, possibly prefix, path), or None when no annotator labelled it.
        quality: estimated probability that ``path`` is right.
        level_quality: per level of ``path``, the probability its class at that level is right.
        source: where the consensus comes from.
        given: the labels given, one per annotator with a label.
        level_votes: per level, class name -> votes (fractions for multi-path annotations).
        pairwise_agreement: per level, the fraction of annotator pairs agreeing (None with < 2 labels there).
        agreement: per level, the fraction of annotators labelling that level who agree with the consensus.
        agreement_overall: fraction of annotators whose label is compatible with the consensus path.
        first_divergence: first level where the annotators' labels differ, or None.
        model_path: the model's most likely full path, or None without a model.
        model_prob: the model's probability of the consensus path, or None.
    """

    item: int
    path: Path | None
    quality: float
    level_quality: tuple[float, ...]
    source: Source
    given: tuple[GivenLabel, ...]
    level_votes: tuple[dict[str, float], ...]
    pairwise_agreement: tuple[float | None, ...]
    agreement: tuple[float | None, ...]
    agreement_overall: float | None
    first_divergence: int | None
    model_path: Path | None = None
    model_prob: float | None = None

    @property
    def n_annotators(self) -> int:
        return len(self.given)


@dataclass
class ConsensusResult:
    """The outcome of :func:`consensus`.

    Attributes:
        labels: item -> consensus path to train on (policy applied).
        excluded: item -> reason it is not trained on.
        items: item -> :class:`ItemConsensus` for every item seen.
        annotators: annotator -> ``model.disagreement.AnnotatorStats``.
        flags: every ``model.disagreement.Flag``, most urgent first.
        policy: the policy applied.
        problems: messages about input that could not be used (unknown labels, ...).
        level_fits: per level, the crowd estimation (confusion matrices, posteriors), rows in ``item_order``.
        item_order: item ids in the row order of ``level_fits``.
        annotator_order: annotator ids in the order of ``level_fits`` confusion matrices.
        used_model: whether model probabilities took part.
        level_probs: the model probabilities given (item -> per level ``(K_k,)``), or None.
    """

    labels: dict[int, Path]
    excluded: dict[int, str]
    items: dict[int, ItemConsensus]
    annotators: dict[str, object]
    flags: list
    policy: ConsensusPolicy
    problems: list[str] = field(default_factory=list)
    level_fits: list[CrowdFit] = field(default_factory=list, repr=False)
    item_order: list[int] = field(default_factory=list, repr=False)
    annotator_order: list[str] = field(default_factory=list, repr=False)
    used_model: bool = False
    level_probs: Mapping[int, Sequence[np.ndarray]] | None = field(default=None, repr=False)

    def policy_record(self) -> dict:
        """What the model manifest records about the training labels."""
        return {
            "consensus_method": "dawid-skene per level" + (" + model" if self.used_model else "") + ", taxonomy-decoded",
            "policy": asdict(self.policy),
            "items_seen": len(self.items),
            "items_trained": len(self.labels),
            "items_excluded": len(self.excluded),
            "flags": len(self.flags),
        }

    def review_list(self) -> list:
        """The flags to review, most urgent first (one entry per flag; see ``model.disagreement.review_list``)."""
        from model.disagreement import review_list

        return review_list(self)

    def to_json(self) -> dict:
        """A JSON-ready dict: summary, items, annotators, flags and the review list."""
        from model.disagreement import result_to_json

        return result_to_json(self)


# ----- reading annotations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Vote:
    annotator: str
    paths: tuple[Path, ...]
    ground_truth: bool
    reviewed: bool


def _tier(v: _Vote) -> int:
    return 2 if v.ground_truth else 1 if v.reviewed else 0


def _collect(
    annotations: Sequence[Annotation], taxonomy: Taxonomy, problems: list[str]
) -> tuple[dict[int, dict[str, _Vote]], list[int]]:
    """Resolved, prefix-collapsed votes per item and annotator (one per annotator: highest tier, then last)."""
    votes: dict[int, dict[str, _Vote]] = {}
    order: list[int] = []
    for ann in annotations:
        item = int(ann.item)
        if item not in votes:
            votes[item] = {}
            order.append(item)
        resolved: list[Path] = []
        for raw in ann.paths:
            try:
                path = taxonomy.resolve(raw)
            except TaxonomyError as exc:
                problems.append(f"item {item}, annotator {ann.annotator}: {exc}")
                continue
            if path not in resolved:
                resolved.append(path)
        deepest = tuple(p for p in resolved if not any(len(q) > len(p) and q[: len(p)] == p for q in resolved))
        if not deepest:
            continue
        vote = _Vote(str(ann.annotator), deepest, bool(ann.ground_truth), bool(ann.reviewed))
        old = votes[item].get(vote.annotator)
        if old is None or _tier(vote) >= _tier(old):
            votes[item][vote.annotator] = vote
    return votes, order


def _level_weights(paths: Sequence[Path], codes: Mapping[Path, Sequence[int]], level: int) -> dict[int, float]:
    """Class index -> weight at ``level`` for one vote (each path weighs 1/len(paths); prefixes stop early)."""
    out: dict[int, float] = {}
    share = 1.0 / len(paths)
    for p in paths:
        c = codes[p][level]
        if c != IGNORE:
            out[c] = out.get(c, 0.0) + share
    return out


# ----- the consensus ----------------------------------------------------------------------------------
def consensus(
    annotations: Sequence[Annotation],
    taxonomy: Taxonomy,
    policy: ConsensusPolicy = ConsensusPolicy(),
    level_probs: Mapping[int, Sequence[np.ndarray]] | None = None,
    crowd_config: CrowdConfig = CrowdConfig(),
) -> ConsensusResult:
    """Consensus paths, their quality, annotator statistics and flags for all items.

    Args:
        annotations: every usable annotation (cancelled ones left out by the caller; an annotation with no
            paths still makes its item known, so that it can be reported as excluded).
        taxonomy: the project's label tree; paths are resolved against it (unknown ones reported).
        policy: which consensus labels training may use, and the flag thresholds.
        level_probs: optional model opinion, item -> list over levels of ``(K_k,)`` out-of-sample
            probability vectors (``K_k = taxonomy.num_classes(k)``). Items missing here have no model opinion.
        crowd_config: settings of the per-level estimation.

    Returns:
        The :class:`ConsensusResult`.

    Raises:
        ConfigError: an invalid policy.
        TaxonomyError: level probabilities whose shape does not match the taxonomy.
    """
    from model.disagreement import annotator_stats, apply_policy, find_flags

    policy.validate()
    problems: list[str] = []
    votes, order = _collect(annotations, taxonomy, problems)
    items = order
    row = {item: i for i, item in enumerate(items)}
    annotators = sorted({a for per in votes.values() for a in per})
    col = {a: j for j, a in enumerate(annotators)}
    L = taxonomy.depth
    all_paths = sorted({p for per in votes.values() for v in per.values() for p in v.paths})
    codes = {p: tuple(taxonomy.encode(p).tolist()) for p in all_paths}
    N, A = len(items), len(annotators)

    model = _model_matrices(level_probs, items, row, taxonomy) if level_probs else None
    fits: list[CrowdFit] = []
    evidence = np.zeros((N, L), dtype=bool)  # (N, L) some annotator labelled level k of item i
    for k in range(L):
        entries = [
            (row[item], col[vote.annotator], c, weight)
            for item, per in votes.items()
            for vote in per.values()
            for c, weight in _level_weights(vote.paths, codes, k).items()
        ]
        table = np.asarray(entries, dtype=np.float64).reshape(-1, 4)  # (E, 4): item row, annotator, class, weight
        idx = table[:, :3].astype(np.int64)
        obs = Observations(idx[:, 0], idx[:, 1], idx[:, 2], table[:, 3])
        evidence[obs.item, k] = True
        fits.append(fit_crowd(obs, N, A, taxonomy.num_classes(k), None if model is None else model[k], crowd_config))

    decoder = _PathDecoder(taxonomy, fits, evidence, model, codes)
    details: dict[int, ItemConsensus] = {}
    for start in range(0, N, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, N))
        crowd_p, model_p = decoder.path_probs(rows)  # (R, P) each
        for r, i in enumerate(rows):
            item = items[i]
            details[item] = decoder.item_consensus(
                item, int(i), list(votes[item].values()), policy, crowd_p[r].tolist(),
                None if model_p is None else model_p[r].tolist(),
            )

    result = ConsensusResult(
        labels={}, excluded={}, items=details, annotators={}, flags=[], policy=policy, problems=problems,
        level_fits=fits, item_order=items, annotator_order=annotators, used_model=model is not None,
        level_probs=level_probs or None,
    )
    result.flags = find_flags(result, taxonomy)
    result.annotators = annotator_stats(result, taxonomy)
    apply_policy(result)
    return result


def _model_matrices(
    level_probs: Mapping[int, Sequence[np.ndarray]], items: list[int], row: dict[int, int], taxonomy: Taxonomy
) -> list[np.ndarray]:
    """Per level ``(N, K_k)`` model probabilities (rows of zeros where the model has no opinion)."""
    mats = [np.zeros((len(items), taxonomy.num_classes(k))) for k in range(taxonomy.depth)]
    for item, probs in level_probs.items():
        if int(item) not in row:
            continue
        if len(probs) != taxonomy.depth:
            raise TaxonomyError(
                f"level_probs[{item}] has {len(probs)} levels but the taxonomy has {taxonomy.depth}; pass the "
                "probabilities of the model trained on this taxonomy."
            )
        for k, p in enumerate(probs):
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            if p.shape[0] != taxonomy.num_classes(k):
                raise TaxonomyError(
                    f"level_probs[{item}][{k}] has {p.shape[0]} classes, the taxonomy's level {k} has "
                    f"{taxonomy.num_classes(k)}; retrain the model after a label config change."
                )
            total = p.sum()
            if total > 0:
                mats[k][row[int(item)]] = p / total
    return mats


class _PathDecoder:
    """Joint decoding of level posteriors over the taxonomy's full paths, one item at a time."""

    def __init__(
        self, taxonomy: Taxonomy, fits: list[CrowdFit], evidence: np.ndarray, model: list[np.ndarray] | None,
        codes: Mapping[Path, Sequence[int]],
    ) -> None:
        self.taxonomy = taxonomy
        self.codes = codes  # path -> (L,) level indices of every path given
        self.class_names = [taxonomy.class_names(k) for k in range(taxonomy.depth)]
        self.paths, self.index = taxonomy.candidate_paths(leafs_only=True)  # P paths, (P, L)
        self.evidence = evidence  # (N, L)
        self.log_post = [np.log(np.clip(f.posterior, 1e-300, None)) for f in fits]  # L x (N, K_k)
        self.has_model = None if model is None else np.stack([m.sum(axis=1) > 0 for m in model], 1).any(1)  # (N,)
        self.model_log = None if model is None else [np.log(np.clip(m, 1e-12, None)) for m in model]
        self._under: dict[Path, tuple[int, ...]] = {}  # path -> candidate rows under it

    def path_probs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities of every full path for the item ``rows``.

        Returns:
            crowd: ``(R, P)`` from the level posteriors of the levels each item has labels at.
            model: ``(R, P)`` from the model's level probabilities, or None without a model.
        """
        P = len(self.paths)
        score = np.zeros((len(rows), P))
        for k, log_post in enumerate(self.log_post):
            score += self.evidence[rows, k][:, None] * log_post[rows][:, self.index[:, k]]
        crowd = _softmax_rows(score)
        if self.model_log is None:
            return crowd, None
        mscore = np.zeros((len(rows), P))
        for k, log_m in enumerate(self.model_log):
            mscore += log_m[rows][:, self.index[:, k]]
        return crowd, _softmax_rows(mscore)

    def _mass(self, probs: Sequence[float], path: Path) -> float:
        """Probability mass of the full paths under ``path`` (the path itself when it is a leaf)."""
        under = self._under.get(path)
        if under is None:
            n = len(path)
            code = self.taxonomy.encode(path)[:n]
            under = tuple(np.flatnonzero((self.index[:, :n] == code).all(axis=1)).tolist())
            self._under[path] = under
        return float(sum(probs[j] for j in under))

    def item_consensus(
        self, item: int, i: int, votes: list[_Vote], policy: ConsensusPolicy, probs: list[float],
        model_probs: list[float] | None,
    ) -> ItemConsensus:
        """The consensus of item row ``i`` from its votes and its path probabilities ``(P,)`` (crowd, model)."""
        L = self.taxonomy.depth
        depth = int(self.evidence[i].sum())  # evidence covers levels 0..depth-1
        if not votes:
            return ItemConsensus(item, None, 0.0, (), Source.NONE, (), tuple({} for _ in range(L)),
                                 (None,) * L, (None,) * L, None, None)
        if self.has_model is not None and not self.has_model[i]:
            model_probs = None

        source = Source.CROWD
        top = max(_tier(v) for v in votes)
        if policy.prefer_ground_truth and top > 0:
            source = Source.GROUND_TRUTH if top == 2 else Source.REVIEWED
            path = _plurality_path([v for v in votes if _tier(v) == top])
        else:
            best = self.paths[max(range(len(probs)), key=probs.__getitem__)]
            path = best[: min(len(best), depth)]
        quality = self._mass(probs, path)
        level_quality = tuple(self._mass(probs, path[: k + 1]) for k in range(len(path)))

        given = []
        codes = self.codes
        for v in votes:
            q = sum(self._mass(probs, p) for p in v.paths) / len(v.paths)
            mp = None if model_probs is None else sum(self._mass(model_probs, p) for p in v.paths) / len(v.paths)
            given.append(GivenLabel(v.annotator, v.paths, q, mp, _first_wrong(v.paths, path), v.ground_truth, v.reviewed))

        level_votes, pairwise, agreement = [], [], []
        first_div = None
        target = (self.taxonomy.encode(path) if path else np.full(L, IGNORE)).tolist()
        for k in range(L):
            weights = [_level_weights(v.paths, codes, k) for v in votes]
            weights = [w for w in weights if w]
            names = self.class_names[k]
            tally: dict[str, float] = {}
            for w in weights:
                for c, x in w.items():
                    tally[names[c]] = tally.get(names[c], 0.0) + x
            level_votes.append(tally)
            if len(weights) >= 2:
                pairs = [
                    sum(wa.get(c, 0.0) * wb.get(c, 0.0) for c in wa) / (sum(wa.values()) * sum(wb.values()))
                    for x, wa in enumerate(weights) for wb in weights[x + 1:]
                ]
                pairwise.append(sum(pairs) / len(pairs))
                if first_div is None and (len(tally) > 1 or any(len(w) > 1 for w in weights)):
                    first_div = k
            else:
                pairwise.append(None)
                if first_div is None and weights and len(weights[0]) > 1:
                    first_div = k
            if weights and target[k] != IGNORE:
                t = int(target[k])
                agreement.append(sum(w.get(t, 0.0) / sum(w.values()) for w in weights) / len(weights))
            else:
                agreement.append(None)
        compatible = [g.first_wrong_level is None for g in given]
        model_path = None if model_probs is None else self.paths[max(range(len(model_probs)), key=model_probs.__getitem__)]
        model_prob = None if model_probs is None or not path else self._mass(model_probs, path)
        return ItemConsensus(
            item=item, path=path, quality=quality, level_quality=level_quality, source=source, given=tuple(given),
            level_votes=tuple(level_votes), pairwise_agreement=tuple(pairwise), agreement=tuple(agreement),
            agreement_overall=sum(compatible) / len(compatible), first_divergence=first_div,
            model_path=model_path, model_prob=model_prob,
        )


def _softmax_rows(score: np.ndarray) -> np.ndarray:
    score = score - score.max(axis=1, keepdims=True)
    e = np.exp(score)
    return e / e.sum(axis=1, keepdims=True)


def _first_wrong(paths: Sequence[Path], target: Path) -> int | None:
    """First level where no path of ``paths`` matches ``target`` (levels both name), or None."""
    worst: int | None = None
    for p in paths:
        n = min(len(p), len(target))
        mismatch = next((k for k in range(n) if p[k] != target[k]), None)
        if mismatch is None:
            return None
        worst = mismatch if worst is None else max(worst, mismatch)
    return worst


def _plurality_path(votes: Sequence[_Vote]) -> Path:
    """The deepest path most of ``votes`` agree on, level by level (ties: the first given)."""
    path: Path = ()
    while True:
        counts: dict[str, float] = {}
        for v in votes:
            below = [p for p in v.paths if len(p) > len(path) and p[: len(path)] == path]
            for p in below:
                counts[p[len(path)]] = counts.get(p[len(path)], 0.0) + 1.0 / len(below)
        if not counts:
            return path
        path = (*path, max(counts, key=lambda name: counts[name]))
