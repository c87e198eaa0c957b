"""A simulated labeling session on animal-mnist, and the bulk pre-annotation write rate (two sub-commands).

``simulate`` (the default): simulated labelers label animal-mnist (10,000 images, 2-level taxonomy: 3 groups,
10 animals) in rounds of ``--batch`` tasks, taking the next tasks of a labeling order; between rounds the
product's training runs in process on the labels so far, with the product's defaults: the features of the
enabled candidates (``Settings.model_candidates``: the encoder's embeddings and ``model.features.pixels``; there is
no "previous" encoder in one session), :func:`model.heads.selection.select_and_fit` with ``Settings.cv_folds`` and
``HeadsConfig()``, the winner's calibration temperature, the propagation choice on the same folds
(``Settings.propagation_choice``, :func:`model.propagation_choice.decide`: label propagation over the kNN graph of
the encoder's embeddings, or its blend with the heads, serves instead when it wins), and the served decoding
(``leafsOnly``: the most probable full path, :func:`model.heads.decode.full_path_log_probs`). The encoder is a MoCo
v2 encoder pretrained with the product's defaults by ``taxomoco pretrain`` on the 10,000 images under a public budget
(``--encoder``, made once with ``--pretrain-minutes`` and cached under ``bench/out/``). After each training, per
order, for the next ``--next`` tasks of the order and for every unlabelled task: the share of pre-annotations a
labeler would accept unchanged (the leaf path is exactly the truth), their micro hierarchical F1, and the labels
spent.

Orders compared in one run (each on the same seeds):

* ``random``: a seeded permutation.
* ``sequential``: Label Studio's default order, by task id; the tasks are imported in a seeded shuffled order
  (the package stores the images sorted by class, and an import in that order would give one class for hundreds of
  tasks).
* ``uncertainty``: least confidence of the calibrated path distribution only (``model.ranking.labeling_order``
  with ``cold_start_per_class=0``); the first round, before any model, is random.
* ``ours``: ``model.ranking.labeling_order`` with the product's defaults (typical coverage of the embeddings while
  there are fewer than ``COLD_START_LABELS_PER_CLASS`` labels per class, then least confidence), on the live
  model's features as the product ranks (``ml_backend.prelabel.live``: the published version's embedding);
  before any model the coverage of the encoder's embeddings.

``write-rate``: how fast bulk pre-annotation (``ml_backend.prelabel``) writes a version's predictions into a real
Label Studio server (started here, as the test suite does) holding ``--tasks`` image tasks: a version is published
with untrained weights (the write path does not depend on their quality), every task's embedding is put into the
project's embedding cache, as a training run leaves it; then the product's own run,
:func:`ml_backend.prelabel.writer.run_prelabel`, writes the predictions of every task, once per ``--chunks`` size on
a fresh version. Baseline in the same run: one ``POST /api/predictions/`` per task, on ``--baseline-tasks`` tasks.
The 100k figure is a linear **extrapolation** of the measured rate.

Usage:
    python bench/labeling_session.py [simulate] [--quick] [--seeds 3] [--rounds 30] [--batch 10] [--next 100]
        [--encoder bench/out/session-encoder] [--out bench/results/labeling_session.txt]
    python bench/labeling_session.py write-rate [--tasks 1000] [--chunks 100 500] [--baseline-tasks 100]
        [--out bench/results/labeling_session_write_rate.txt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: run from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.datasets import ANIMAL_TAXONOMY, ANIMAL_TAXONOMY_TREE, load_animal_mnist  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from ml_backend.encoder_dir import load_encoder  # noqa: E402
from ml_backend.labelstudio import predictions as ls_predictions  # noqa: E402
from ml_backend.labelstudio.client import LabelStudioClient  # noqa: E402
from ml_backend.labelstudio.snapshot import pull_tasks  # noqa: E402
from ml_backend.net.images import ImageFetcher  # noqa: E402
from ml_backend.prelabel.order import COLD_START_BUDGET  # noqa: E402
from ml_backend.prelabel.writer import run_prelabel  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from model.atomic import atomic_write_json  # noqa: E402
from model.bundle import publish  # noqa: E402
from model.encoder.backbone import build_backbone  # noqa: E402
from model.encoder.cache import EmbeddingCache  # noqa: E402
from model.encoder.config import EncoderConfig  # noqa: E402
from model.encoder.embedder import Embedder  # noqa: E402
from model.evaluation import hierarchical_prf  # noqa: E402
from model.features.pixels import PixelFeatures  # noqa: E402
from model.heads.candidates import FeatureSource, parse_candidates  # noqa: E402
from model.heads.decode import full_path_log_probs  # noqa: E402
from model.heads.heads import HeadsConfig, TaxonomyHeads  # noqa: E402
from model.heads.selection import select_and_fit  # noqa: E402
from model.heads.training import heads_logits, labelled_rows  # noqa: E402
from model.neighbors.graph import knn_graph  # noqa: E402
from model.paired_gain import GainRule  # noqa: E402
from model.propagation import PROPAGATION_NEIGHBOURS  # noqa: E402
from model.propagation_choice import BLEND, PROPAGATION, ChoiceRule, decide, spread_table  # noqa: E402
from model.ranking import labeling_order  # noqa: E402
from tests.servers import LabelStudioServer, label_studio_binary  # noqa: E402

ORDERS = ("random", "sequential", "uncertainty", "ours")
EXTRA_ORDERS = ("coverage", "ours-lc", "ours-flat")  # --orders; and ours@K (see order_rule)


def order_rule(order: str, cold_start_per_class: float) -> tuple[float, bool]:
    """(labels per class below which the order covers the embeddings, diverse uncertainty) of a ranked order.

    ``uncertainty``: plain least confidence from the first model on; ``coverage``: typical coverage at every round
    (the cold-start rule never ends); ``ours``: the product's defaults; ``ours-lc``: the product's switch with plain
    least confidence after it (no diversity); ``ours@K``: the product's order with COLD_START_LABELS_PER_CLASS=K;
    ``ours-flat``: the product's order with its cold-start picks from one clustering (``cover_step=0``, the rule
    before coverage came in steps of one pick per class).
    """
    if order == "uncertainty":
        return 0.0, False
    if order == "coverage":
        return float("inf"), True
    if order == "ours-lc":
        return cold_start_per_class, False
    if order.startswith("ours@"):
        return float(order[5:]), True
    return cold_start_per_class, True


def order_name(text: str) -> str:
    """argparse type of ``--orders``: a known order or ``ours@K``."""
    if text in ORDERS + EXTRA_ORDERS:
        return text
    if text.startswith("ours@"):
        try:
            if float(text[5:]) >= 0:
                return text
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"unknown order {text!r}: choose from {', '.join(ORDERS + EXTRA_ORDERS)} or "
                                     "ours@K (K labels per class before uncertainty)")
ACCEPT_TARGET = 0.8


@dataclass
class RoundRecord:
    """What one training between rounds gave, for one order and seed."""

    order: str
    seed: int
    labels: int
    chosen: str  # the candidate select_and_fit chose, and the propagation model serving instead ("" before a model)
    next_accept: float  # leaf-exact share among the next tasks of the order (NaN before a model)
    next_hf: float
    all_accept: float  # leaf-exact share among all unlabelled tasks
    all_hf: float
    seconds: float  # training + prediction + ordering


def load_features(encoder_dir: Path | None, images: np.ndarray) -> dict[FeatureSource, np.ndarray]:
    """The candidates' features of every image: pixels, and the encoder's embeddings (cached next to it)."""
    pixels = PixelFeatures().embed([Image.fromarray(im) for im in images])  # (N, 798)
    features = {FeatureSource.PIXELS: pixels}
    if encoder_dir is not None:
        cfg, state, version = load_encoder(encoder_dir)
        cache = encoder_dir / f"animal-mnist-{version}-{len(images)}.npy"
        if cache.is_file():
            emb = np.load(cache)
        else:
            backbone = build_backbone(cfg)
            backbone.load_state_dict(state)
            emb = Embedder(backbone, cfg, device="cpu", batch_size=256).embed(list(images))  # (N, D)
            np.save(cache, emb)
        features[FeatureSource.ENCODER] = emb
    return features


def pretrain_encoder(encoder_dir: Path, images: np.ndarray, minutes: float) -> None:
    """``taxomoco pretrain`` with the product's defaults on the images, under a public time budget."""
    folder = encoder_dir.parent / "animal-mnist-images-flat"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        target = folder / f"animal-{i:05d}.png"
        if not target.exists():
            Image.fromarray(im).save(target)
    cmd = [sys.executable, "-m", "ml_backend.cli", "pretrain", str(folder), "--out", str(encoder_dir),
           "--max-minutes", str(minutes)]
    print("pretraining:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


class Session:
    """One order's labeling session on one seed: labels, the model of the last training, the order."""

    def __init__(self, order: str, seed: int, features: dict[FeatureSource, np.ndarray],
                 truth: list[tuple[str, ...]], settings: Settings, graph: tuple[np.ndarray, np.ndarray]) -> None:
        self.order, self.seed, self.features, self.truth, self.settings = order, seed, features, truth, settings
        self.graph = graph  # the kNN graph of the served encoder's embeddings (the product's neighbour index)
        n = len(truth)
        rng = np.random.default_rng(1000 + seed)
        self.permutation = rng.permutation(n)  # random order
        self.import_order = np.random.default_rng(2000 + seed).permutation(n)  # task id -> image (sequential)
        self.labelled = np.zeros(n, dtype=bool)
        self.candidates = parse_candidates(settings.model_candidates)
        self.paths = ANIMAL_TAXONOMY.candidate_paths(leafs_only=True)[0]
        self.n_leaves = len(ANIMAL_TAXONOMY.leaves())

    def train(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
        """The product's training on the labels so far: (chosen, path row per image, top path p, its features).

        As ``ml_backend.training``: the heads' model choice, then the propagation choice on the same folds
        (``PROPAGATION_CHOICE``); a version chosen as propagation or its blend serves the propagated table for every
        image (all are indexed here), as ``model.predictor.Predictor.decode_rows`` does.
        """
        rows = np.flatnonzero(self.labelled)
        given = [self.truth[i] for i in rows]
        if len(rows) < max(2, self.settings.min_labels_to_train) or len({p[-1] for p in given}) < 2:
            return None
        torch.manual_seed(self.seed)
        first = self.features[next(iter(self.features))][rows]
        labelled_index, encoded, _ = labelled_rows(first, given, ANIMAL_TAXONOMY)
        selection, heads = select_and_fit({s: f[rows] for s, f in self.features.items()}, self.candidates, encoded,
                                          ANIMAL_TAXONOMY, folds=self.settings.cv_folds,
                                          labelled_index=labelled_index, heads_cfg=HeadsConfig(),
                                          rule=GainRule(self.settings.model_choice))
        x = self.features[selection.chosen.features]
        served = np.exp(full_path_log_probs(heads_logits(heads, torch.from_numpy(np.ascontiguousarray(
            x, dtype=np.float32))), ANIMAL_TAXONOMY, selection.cv.temperature))  # (N, P_full)
        name = selection.chosen.name
        decision = decide(name, selection.cv, self.graph, rows[np.asarray(selection.cv.labelled_index)],
                          ANIMAL_TAXONOMY, ChoiceRule(self.settings.propagation_choice))
        if decision.chosen in (PROPAGATION, BLEND):
            table = spread_table(decision.chosen, self.graph, {int(r): [self.truth[r]] for r in rows}, str,
                                 ANIMAL_TAXONOMY)
            served = table.served(served, [str(i) for i in range(len(served))])
            name = f"{name} / {decision.chosen}"
        # leafsOnly decoding as served: the most probable full path (decode(..., leafs_only=True) top-1).
        return name, served.argmax(axis=1), served.max(axis=1), x

    def next_order(self, model: tuple[str, np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Unlabelled image rows in the order the labelers take them."""
        free = ~self.labelled
        if self.order == "random" or (self.order == "uncertainty" and model is None):
            return self.permutation[free[self.permutation]]
        if self.order == "sequential":
            return self.import_order[free[self.import_order]]
        cold, diverse = order_rule(self.order, self.settings.cold_start_per_class)
        emb = self.features.get(FeatureSource.ENCODER, self.features[FeatureSource.PIXELS]) if model is None \
            else model[3]
        top = None if model is None else model[2]
        # The product's k-means seed is 0; each simulated session draws its own, so the spread covers it.
        ranked = labeling_order(emb, self.labelled, top, self.n_leaves, cold, budget=COLD_START_BUDGET,
                                seed=self.seed, diverse=diverse, cover_step=0 if self.order == "ours-flat" else None)
        return np.array([r.index for r in ranked], dtype=np.int64)

    def score(self, rows: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
        """Leaf-exact share and micro hF of the pre-annotations of ``rows``."""
        if len(rows) == 0:
            return float("nan"), float("nan")
        truth = [self.truth[i] for i in rows]
        guess = [self.paths[pred[i]] for i in rows]
        accept = float(np.mean([g == t for g, t in zip(guess, truth)]))
        return accept, float(hierarchical_prf(truth, guess, [False] * len(rows))["hF"])

    def run(self, rounds: int, batch: int, next_n: int) -> list[RoundRecord]:
        records = []
        for _ in range(rounds + 1):
            start = time.perf_counter()
            model = self.train()
            order = self.next_order(model)
            seconds = time.perf_counter() - start
            if model is None:
                nxt = al = (float("nan"), float("nan"))
            else:
                nxt = self.score(order[:next_n], model[1])
                al = self.score(np.flatnonzero(~self.labelled), model[1])
            records.append(RoundRecord(self.order, self.seed, int(self.labelled.sum()), model[0] if model else "",
                                       *nxt, *al, seconds))
            self.labelled[order[:batch]] = True
        return records


def label_config() -> str:
    groups = "".join(f'<Choice value="{g}">' + "".join(f'<Choice value="{a}"/>' for a in animals) + "</Choice>"
                     for g, animals in ANIMAL_TAXONOMY_TREE.items())
    return ('<View><Image name="image" value="$image"/><Taxonomy name="taxonomy" toName="image" leafsOnly="true" '
            f'maxUsages="1">{groups}</Taxonomy></View>')


def new_version(settings: Settings, pid: int, client: LabelStudioClient, seed: int) -> str:
    """Publish an untrained version and cache an embedding for every task image (what training leaves behind)."""
    paths = settings.project(pid)
    torch.manual_seed(seed)
    cfg = EncoderConfig(arch="resnet18-half", input_size=32)
    backbone = build_backbone(cfg)
    heads = TaxonomyHeads(cfg.out_dim, [ANIMAL_TAXONOMY.num_classes(k) for k in range(ANIMAL_TAXONOMY.depth)])
    manifest = publish(paths.models, ANIMAL_TAXONOMY, cfg, backbone.state_dict(), heads, 1.0, {}, f"bench-{seed}")
    tasks = pull_tasks(client, pid, paths.tasks_snapshot, label_config(), 0.0).tasks
    fetcher = ImageFetcher(settings, client)
    hashes = [hashlib.sha256(t.data["image"].encode()).hexdigest() for t in tasks]
    cache = EmbeddingCache(paths.cache, manifest.encoder_version, int(manifest.embedding_dim))
    rng = np.random.default_rng(seed)
    cache.put(hashes, rng.normal(size=(len(tasks), int(manifest.embedding_dim))).astype(np.float32))
    atomic_write_json(paths.images_index, {fetcher.key(t.data["image"]): h for t, h in zip(tasks, hashes)})
    return str(manifest.version)


def write_rate(args: argparse.Namespace) -> int:
    """The ``write-rate`` sub-command: bulk pre-annotation into a real Label Studio against one POST per task."""
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="taxomoco-labeling-session-"))
    ls = LabelStudioServer(work / "ls", label_studio_binary())
    print("starting Label Studio ...", flush=True)
    ls.start()
    rows = ["| writer | tasks | seconds (whole run) | predictions/s (whole run) | predictions/s (writes only) | "
            "100k tasks (extrapolated) |", "|---|---|---|---|---|---|"]
    try:
        pid = ls.create_project(label_config(), title="labeling session bench")
        ids = ls.import_tasks(pid, [{"image": f"/data/local-files/?d=animals/{i:06d}.png"} for i in range(args.tasks)])
        client = LabelStudioClient(ls.url, ls.admin.token)
        for seed, chunk in enumerate(args.chunks):
            settings = Settings.from_env(env={}, model_dir=work / "models", label_studio_url=ls.url,
                                         label_studio_api_key=ls.admin.token, prelabel_chunk=chunk, device="cpu")
            version = new_version(settings, pid, client, seed)
            start = time.perf_counter()
            out = run_prelabel(settings, settings.project(pid))
            seconds = time.perf_counter() - start
            assert out["status"] == "done" and out["created"] == len(ids), out
            rate = len(ids) / seconds
            rows.append(f"| ours, chunks of {chunk} | {len(ids)} | {seconds:.1f} | {rate:.0f} | {out['rate_per_s']:.0f} "
                        f"| {100_000 / rate / 60:.1f} min |")
            print(rows[-1], f"(version {version}, pinned={out['pinned']}, deleted={out['deleted']})", flush=True)
        n = min(args.baseline_tasks, len(ids))
        start = time.perf_counter()
        for tid in ids[:n]:
            client.request("POST", "/api/predictions/", "create one prediction",
                           json={"task": tid, "result": [], "score": 0.5, "model_version": "one-by-one"})
        seconds = time.perf_counter() - start
        rate = n / seconds
        rows.append(f"| baseline: one POST /api/predictions/ per task | {n} | {seconds:.1f} | {rate:.0f} | {rate:.0f} "
                    f"| {100_000 / rate / 60:.1f} min |")
        print(rows[-1], flush=True)
        assert ls_predictions.model_version_counts(client, pid).get("one-by-one") == n
    finally:
        ls.stop()
    text = "\n".join(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Bulk pre-annotation write rate into a real Label Studio 1.23 (SQLite)\n\n"
        f"command: python bench/labeling_session.py {' '.join(sys.argv[1:])}\n"
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs (shared with other work), torch threads 1\n"
        "The 100k column is a linear extrapolation of the measured rate, not a measurement.\n\n" + text + "\n")
    print(text)
    return 0




def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.array([x for x in values if not np.isnan(x)], dtype=np.float64)
    return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))


def _cell(values: Sequence[float]) -> str:
    m, s = _mean_std(values)
    return "–" if np.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def labels_to_reach(records: list[RoundRecord], key: str, target: float) -> int | None:
    """Labels spent at the first training whose ``key`` share reaches ``target`` (None: never in this run)."""
    for r in records:
        if getattr(r, key) >= target:
            return r.labels
    return None


def summary(records: list[RoundRecord], seeds: list[int], per_class_labels: int) -> list[str]:
    """The result table (mean ± std over seeds, in points) and the goal check."""
    orders = list(dict.fromkeys(r.order for r in records))
    labels = sorted({r.labels for r in records})
    lines = ["| labels | order | accepted, next tasks | hF, next tasks | accepted, all unlabelled | hF, all unlabelled "
             "| model chosen (per seed) | seconds/round |", "|---|---|---|---|---|---|---|---|"]
    for n in labels:
        if n == 0:
            continue
        for order in orders:
            rs = [r for r in records if r.order == order and r.labels == n]
            if not rs:
                continue
            lines.append(f"| {n} | {order} | {_cell([r.next_accept for r in rs])} | {_cell([r.next_hf for r in rs])} "
                         f"| {_cell([r.all_accept for r in rs])} | {_cell([r.all_hf for r in rs])} | "
                         f"{', '.join(r.chosen or '-' for r in rs)} | {np.mean([r.seconds for r in rs]):.1f} |")
    lines += ["", f"Labels spent to reach {ACCEPT_TARGET:.0%} accepted suggestions (per seed; '>N': not within this "
              "run):", "", "| order | on all unlabelled tasks | on the next tasks of the order |", "|---|---|---|"]
    last = max(labels)
    reach: dict[str, list[int | None]] = {}
    for order in orders:
        cells = []
        for key in ("all_accept", "next_accept"):
            got = [labels_to_reach([r for r in records if r.order == order and r.seed == s], key, ACCEPT_TARGET)
                   for s in seeds]
            if key == "all_accept":
                reach[order] = got
            cells.append(", ".join(str(g) if g is not None else f">{last}" for g in got))
        lines.append(f"| {order} | {cells[0]} | {cells[1]} |")
    at = {o: [r.all_accept for r in records if r.order == o and r.labels == per_class_labels] for o in orders}
    lines.append("")
    if at.get("ours") and at.get("random"):
        gain = 100 * (_mean_std(at["ours"])[0] - _mean_std(at["random"])[0])
        lines.append(f"Goal 1 (ours >= random + 10 points leaf accuracy on the unlabelled tasks at 2 labels per class = "
                     f"{per_class_labels} labels): ours {_cell(at['ours'])}, random {_cell(at['random'])}, "
                     f"difference {gain:+.1f} points: {'MET' if gain >= 10 else 'NOT MET'}.")
    ours_n = [x if x is not None else last + 1 for x in reach.get("ours", [])]
    rand_n = [x if x is not None else last + 1 for x in reach.get("random", [])]
    if not ours_n or not rand_n:
        return lines
    if all(x > last for x in ours_n + rand_n):
        verdict = f"UNDECIDED: no order reached {ACCEPT_TARGET:.0%} on all unlabelled tasks within {last} labels"
    else:
        verdict = "MET" if np.mean(ours_n) < np.mean(rand_n) else "NOT MET"
    lines.append(f"Goal 2 (fewer labels than random to reach {ACCEPT_TARGET:.0%} accepted suggestions on all unlabelled "
                 f"tasks): {verdict}.")
    return lines


def plot(records: list[RoundRecord], png: Path, next_n: int) -> None:
    """Accepted share against labels spent, per order (mean ± std band): all unlabelled, and the next tasks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: only for the picture
    from matplotlib.figure import Figure

    orders = list(dict.fromkeys(r.order for r in records))
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("all_accept", "all unlabelled tasks"),
                                      ("next_accept", f"the next {next_n} tasks of the order"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for order in orders:
            labels = sorted({r.labels for r in records if r.order == order and r.labels > 0})
            stats = [_mean_std([getattr(r, key) for r in records if r.order == order and r.labels == n])
                     for n in labels]
            mean, std = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            ax.plot(labels, 100 * mean, "o-", ms=3, label=order)
            ax.fill_between(labels, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
        ax.axhline(100 * ACCEPT_TARGET, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("labels spent")
        ax.set_ylabel("pre-annotations accepted unchanged (%)")
        ax.set_title(f"animal-mnist: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def simulate(args: argparse.Namespace) -> int:
    """The ``simulate`` sub-command (see the module docstring)."""
    torch.set_num_threads(1)
    if args.quick:
        args.rounds = min(args.rounds, 10)
    started = time.time()
    head = header("Simulated labeling session on animal-mnist (2-level taxonomy)")
    images, truth = load_animal_mnist()
    if args.images:
        keep = np.random.default_rng(0).choice(len(images), args.images, replace=False)
        images, truth = images[keep], [truth[i] for i in keep]
    encoder: Path | None = args.encoder
    if encoder is not None and not (encoder / "encoder.safetensors").is_file():
        pretrain_encoder(encoder, images, args.pretrain_minutes)
    settings = Settings.from_env(env={})
    features = load_features(encoder, images)
    graph = knn_graph(features.get(FeatureSource.ENCODER, features[FeatureSource.PIXELS]), PROPAGATION_NEIGHBOURS)
    print(f"features: {', '.join(f'{s.value} {f.shape}' for s, f in features.items())}, kNN graph "
          f"({time.time() - started:.0f} s)", flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    records: list[RoundRecord] = []
    for seed in seeds:
        for order in args.orders:
            t0 = time.time()
            got = Session(order, seed, features, [tuple(p) for p in truth], settings, graph).run(
                args.rounds, args.batch, args.next)
            records += got
            last = got[-1]
            print(f"seed {seed} {order}: {last.labels} labels, accepted all {last.all_accept:.3f}, next "
                  f"{last.next_accept:.3f} ({time.time() - t0:.0f} s)", flush=True)
    n_leaves = len(ANIMAL_TAXONOMY.leaves())
    two_per_class = 2 * n_leaves
    encoder_line = (f"Encoder: {encoder} ({load_encoder(encoder)[2]}; MoCo v2, the product's defaults, `taxomoco "
                    f"pretrain` on the {len(images):,} images, --max-minutes as recorded in its pretrain_config.json)"
                    if encoder is not None else "Encoder: none (pixels only)")
    text = "\n".join(head + [
        f"{len(images):,} images, {n_leaves} leaf classes; rounds of {args.batch} labels, {args.rounds} rounds, "
        f"seeds {seeds}; next tasks = the first {args.next} of the order after each training. Product defaults: "
        f"candidates {', '.join(c.name for c in parse_candidates(settings.model_candidates) if c.features in features)} "
        f"(the enabled ones with features in one session), CV_FOLDS "
        f"{settings.cv_folds}, PROPAGATION_CHOICE {settings.propagation_choice} (label propagation over the kNN graph "
        f"of the encoder's embeddings, k={PROPAGATION_NEIGHBOURS}, or its blend with the heads, when it wins on the "
        f"heads' folds; 'model chosen' names it after the heads), "
        f"COLD_START_LABELS_PER_CLASS {settings.cold_start_per_class:g}, cold-start budget "
        f"{COLD_START_BUDGET}, MIN_LABELS_TO_TRAIN {settings.min_labels_to_train}.",
        encoder_line,
        "Cells: mean ± std over the seeds, in percent. 'accepted' = the pre-annotation's leaf path is exactly the "
        "truth (a labeler submits it unchanged).",
        "", *summary(records, seeds, two_per_class), "",
        f"Wall time {time.time() - started:.0f} s. " + load_line("at the end"), ""])
    write_result(args.out, text)
    plot(records, args.out.with_suffix(".png"), args.next)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    print(f"curve: {args.out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser("simulate", help="simulated labeling session (the default)")
    sim.add_argument("--quick", action="store_true", help="at most 10 rounds (under 10 minutes on 2 CPU cores)")
    sim.add_argument("--seeds", type=int, default=3)
    sim.add_argument("--orders", nargs="+", type=order_name, default=list(ORDERS),
                     help=f"orders to compare: {', '.join(ORDERS + EXTRA_ORDERS)}, ours@K (default: %(default)s)")
    sim.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (choices "
                     "are made on other seeds than the reported ones)")
    sim.add_argument("--rounds", type=int, default=30)
    sim.add_argument("--batch", type=int, default=10)
    sim.add_argument("--next", type=int, default=100)
    sim.add_argument("--images", type=int, default=0, help="a seeded subset of the images (0: all 10,000)")
    sim.add_argument("--encoder", type=Path, default=Path("bench/out/session-encoder"),
                     help="encoder directory; pretrained here when missing")
    sim.add_argument("--no-encoder", dest="encoder", action="store_const", const=None,
                     help="pixel features only (the smoke test)")
    sim.add_argument("--pretrain-minutes", type=float, default=5.0)
    sim.add_argument("--out", type=Path, default=Path("bench/results/labeling_session.txt"))
    wr = sub.add_parser("write-rate", help="bulk pre-annotation write rate into a real Label Studio")
    wr.add_argument("--tasks", type=int, default=1000)
    wr.add_argument("--chunks", type=int, nargs="+", default=[100, 500])
    wr.add_argument("--baseline-tasks", type=int, default=100)
    wr.add_argument("--out", type=Path, default=Path("bench/results/labeling_session_write_rate.txt"))
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("simulate", "write-rate", "-h", "--help"):
        argv = ["simulate", *argv]
    args = parser.parse_args(argv)
    return write_rate(args) if args.command == "write-rate" else simulate(args)


if __name__ == "__main__":
    raise SystemExit(main())
