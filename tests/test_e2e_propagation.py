"""End to end: a training picks label propagation by its own rule, and Label Studio holds what it serves.

A real Label Studio project of synthetic images whose structure makes propagation the right model: flat colours on a
four-armed spiral in RGB space (:func:`spiral`), one arm per leaf of :data:`tests.servers.TWO_LEVEL_CONFIG`, images a
few units apart along an arm and :data:`ARM_GAP` between arms. Six images per arm are labelled through Label Studio,
and its webhooks start the trainings in ``taxomoco serve`` (:data:`tests.servers.FAST_TRAINING_ENV`,
``PROPAGATION_CHOICE`` at its default ``one-se``). On the heads' cross-validation folds a held-out label's nearest
labels of the other folds often lie on another arm (the heads follow them: the leaves interleave radially), while
the unlabelled images of its own arm carry its neighbours' labels to it over the kNN graph: propagation gains more
than one standard error. After training the test checks ``/job_status`` (the choice), the live version's manifest
(``served_model``, ``propagated.npz``), and the bulk pre-annotations Label Studio holds on the unlabelled tasks: that
version's, equal to what ``/predict`` answers, paths of the taxonomy, mostly right.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from bench.datasets import png_bytes
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.paths import ProjectPaths
from model.bundle import PROPAGATED
from model.propagation_choice import BLEND, PROPAGATION
from model.ssl.plan import PRETRAIN_MIN_IMAGES
from tests.servers import TWO_LEVEL_CONFIG, BackendServer, LabelStudioServer, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

LEAVES = [("Animal", "Cat"), ("Animal", "Dog"), ("Plant", "Tree"), ("Plant", "Flower")]
LABELS_PER_LEAF = 6
ARM_GAP = 40.0
"""Distance in RGB between neighbouring arms of the spiral (its images are ``STEP`` apart along an arm)."""
STEP = 3.0
RADII = (15.0, 110.0)
"""Where the arms start and end: distance in RGB from mid-grey."""
DATA_SEED = 0
AUTH = ("ls-propagation", "propagation-pass-1234")
"""The backend's Basic auth (the recommended deployment; /job_status needs it), set in Label Studio's connection."""
MIN_SERVED_ACCURACY = 0.85
"""Leaf accuracy of the served pre-annotations on the unlabelled images: 0.94-1.00 (propagation chosen on all 8 draws,
fold hF 0.79-0.92 against the heads' 0.54-0.74) when the training's choice is replayed offline on this data with the
initial encoder (``bench.label_propagation.product_choice`` on the served index's encoder, seeds 0-7)."""


def spiral(seed: int = DATA_SEED) -> list[tuple[tuple[str, str], list[np.ndarray], list[int]]]:
    """``(leaf, images, labelled positions)`` per leaf: one arm of a four-armed spiral of flat colours.

    In the plane of RGB space through mid-grey orthogonal to the grey axis, arm ``k`` is ``r = RADII[0] + b theta``
    at angle ``theta + k pi / 2`` (``b`` puts :data:`ARM_GAP` between neighbouring arms), sampled every :data:`STEP`;
    each image is its colour plus Gaussian noise (sigma 3), ``(32, 32, 3)`` uint8. :data:`LABELS_PER_LEAF` evenly
    spaced positions of each arm are labelled.
    """
    rng = np.random.default_rng(seed)
    u, v = np.array([1.0, -1.0, 0.0]) / np.sqrt(2), np.array([1.0, 1.0, -2.0]) / np.sqrt(6)
    b, offset = 4 * ARM_GAP / (2 * np.pi), rng.uniform(0, 2 * np.pi)
    out = []
    for k, leaf in enumerate(LEAVES):
        colours, theta = [], 0.0
        while RADII[0] + b * theta <= RADII[1]:
            r, angle = RADII[0] + b * theta, offset + theta + k * np.pi / 2
            colours.append(128 + r * (np.cos(angle) * u + np.sin(angle) * v))
            theta += STEP / r
        images = [np.clip(c + rng.normal(0, 3, size=(32, 32, 3)), 0, 255).astype(np.uint8) for c in colours]
        n = len(images)
        out.append((leaf, images, [round(j * (n - 1) / (LABELS_PER_LEAF - 1)) for j in range(LABELS_PER_LEAF)]))
    return out


def result(path: tuple[str, ...]) -> list[dict]:
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def predicted_path(prediction: dict) -> tuple[str, ...] | None:
    items = prediction.get("result") or []
    if not items:
        return None
    assert len(items) == 1 and items[0]["type"] == "taxonomy", items
    paths = items[0]["value"]["taxonomy"]
    assert len(paths) == 1, paths  # maxUsages="1"
    return tuple(paths[0])


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    # MIN_LABELS_TO_TRAIN: the heads (and the model choice) train once, on every label, not on whichever prefix of
    # the burst of webhooks a training happens to start with (a choice made on N labels stands until 1.5 N)
    # PRETRAIN_MIN_IMAGES back at the product's default (FAST_TRAINING_ENV sets 0): a project this small is not
    # pretrained; one epoch of MoCo with colour jitter on flat colours makes them all alike (near-duplicates)
    env = {"MIN_LABELS_TO_TRAIN": str(len(LEAVES) * LABELS_PER_LEAF), "PRETRAIN_MIN_IMAGES": str(PRETRAIN_MIN_IMAGES)}
    server = BackendServer(tmp_path_factory.mktemp("e2e-propagation"), env=env, auth=AUTH)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_training_serves_propagation_and_label_studio_holds_it(label_studio: LabelStudioServer,
                                                                 backend: BackendServer) -> None:
    pid = label_studio.create_project(TWO_LEVEL_CONFIG, title="taxomoco propagation e2e")
    made = spiral()
    names = [(f"c{c}-{i:03d}.png", leaf, img) for c, (leaf, imgs, _) in enumerate(made) for i, img in enumerate(imgs)]
    ids = label_studio.import_images(pid, {name: png_bytes(img) for name, _, img in names})
    task = {name: tid for (name, _, _), tid in zip(names, ids)}
    truth = {task[name]: leaf for name, leaf, _ in names}
    label_studio.connect_backend(pid, backend.url, auth=AUTH)
    # round-robin over the arms: the j-th label of every leaf, then the (j+1)-th
    labelled = [task[f"c{c}-{at[j]:03d}.png"] for j in range(LABELS_PER_LEAF) for c, (_, _, at) in enumerate(made)]
    for tid in labelled:  # through Label Studio: each annotation's webhook schedules a training
        label_studio.annotate(tid, result(truth[tid]))
    unlabelled = {tid: truth[tid] for tid in ids if tid not in set(labelled)}

    http = requests.Session()
    http.auth = AUTH
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)

    seen: dict = {}

    def served() -> bool:
        """Idle, the live version trained on every label, and Label Studio holds its prediction on every unlabelled task."""
        st = seen["status"] = backend.job_status(pid)
        if st.get("queued") or st.get("running"):
            return False
        last = st.get("last_success") or {}
        trained_on = ((last.get("result") or {}).get("counts") or {}).get("trained_on", 0)
        if not last.get("version") or trained_on < len(labelled):
            return False
        got = {}
        for t in client.iter_tasks(pid):
            mine = [p for p in t.predictions if p.get("model_version") == last["version"]]
            if t.id in unlabelled and mine:
                assert len(mine) == 1, t.predictions  # one prediction per version and task
                got[t.id] = mine[0]
        seen["predictions"], seen["version"] = got, last["version"]
        return len(got) == len(unlabelled)

    assert wait_until(served, 600, interval_s=3.0), (
        f"Label Studio holds no complete pre-annotation of the unlabelled tasks; job status {seen.get('status')}\n"
        f"{backend.log()[-6000:]}")
    version, stored = seen["version"], seen["predictions"]

    # the training's own rule chose propagation (or its blend with the heads) ...
    choice = seen["status"]["last_success"]["result"]["model_choice"]["propagation"]
    scores = {n: s["fold_hF"] for n, s in choice.get("candidates", {}).items()}
    print(f"choice: {choice['chosen']} by rule {choice['rule']}: {choice['reason']}; fold hF {scores}")
    assert choice["rule"] == "one-se", choice  # the default
    assert choice["chosen"] in (PROPAGATION, BLEND), choice
    # ... and the live version serves it
    models = ProjectPaths(backend.model_dir, pid).models
    assert (models / "LIVE").read_text().strip() == version
    manifest = json.loads((models / "versions" / version / "manifest.json").read_text())
    assert manifest["extra"]["served_model"].endswith(f" {choice['chosen']}"), manifest["extra"]
    assert (models / "versions" / version / PROPAGATED).is_file()

    # what Label Studio holds is what /predict answers for the same tasks
    tasks = [label_studio.task(tid) for tid in unlabelled]
    answer = http.post(f"{backend.url}/predict", timeout=120,
                       json={"tasks": tasks, "project": pid, "label_config": TWO_LEVEL_CONFIG})
    assert answer.status_code == 200, answer.text
    live = dict(zip(unlabelled, answer.json()["results"]))
    for tid in unlabelled:
        assert live[tid]["model_version"] == version, live[tid]
        assert predicted_path(live[tid]) == predicted_path(stored[tid]), (tid, live[tid], stored[tid])
        assert float(live[tid]["score"]) == pytest.approx(float(stored[tid]["score"]), abs=1e-3), (live[tid], stored[tid])

    # paths of the taxonomy (the leaf under its group), and mostly right
    paths = {tid: predicted_path(stored[tid]) for tid in unlabelled}
    assert all(p in LEAVES for p in paths.values()), paths
    accuracy = float(np.mean([paths[tid] == unlabelled[tid] for tid in unlabelled]))
    print(f"served leaf accuracy on {len(unlabelled)} unlabelled tasks: {accuracy:.3f} (version {version}, "
          f"served model {manifest['extra']['served_model']})")
    assert accuracy >= MIN_SERVED_ACCURACY, (accuracy, choice)
