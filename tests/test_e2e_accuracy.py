"""End to end on the product's defaults: what a labeler is served is never worse than a trivial model.

A real Label Studio project of 300 animal-mnist silhouettes (the two-level taxonomy of :mod:`bench.datasets`),
8 labels per animal submitted through Label Studio, training started by Label Studio's webhooks in ``taxomoco
serve`` with its default method settings (only operational settings differ: CPU, one thread, loopback). After
training, the pre-annotations Label Studio holds for the 220 held-out tasks (written by the backend's bulk
pre-annotation) are compared with the truth, and with pixels + logistic regression trained on the same 80 labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bench.datasets import animal_label_config, animal_path, content_groups, load_animal_mnist_arrays, png_bytes, taxonomy_result
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.settings import Settings
from tests.servers import FAST_TRAINING_ENV, BackendServer, LabelStudioServer, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

LABELS_PER_CLASS = 8
HELD_OUT_PER_CLASS = 22
AUTH = ("ls-accuracy", "accuracy-pass-1234")
"""Basic auth of the backend (the recommended deployment; /job_status needs it), set in Label Studio's connection."""
OPERATIONAL = {"DEVICE", "TAXOMOCO_HTTP_THREADS", "LOG_LEVEL", "OMP_NUM_THREADS", "ALLOW_PRIVATE_SETUP_HOSTS"}


def _defaults_env() -> dict[str, str]:
    """FAST_TRAINING_ENV's method settings put back to the product's defaults (operational ones kept)."""
    defaults = {f.metadata["env"]: f.default for f in dataclasses.fields(Settings)}
    env = {}
    for name in FAST_TRAINING_ENV:
        if name in OPERATIONAL or name not in defaults:
            continue
        value = defaults[name]
        env[name] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _split(images: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """8 labelled and 22 held-out distinct images per animal (one copy of each duplicated image)."""
    groups = content_groups(images)
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    train, test = [], []
    for cls in range(10):
        idx = [int(i) for i in rng.permutation(np.flatnonzero(labels == cls))]
        distinct = []
        for i in idx:
            if int(groups[i]) not in seen:
                seen.add(int(groups[i]))
                distinct.append(i)
        train += distinct[:LABELS_PER_CLASS]
        test += distinct[LABELS_PER_CLASS:LABELS_PER_CLASS + HELD_OUT_PER_CLASS]
    return train, test


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    server = BackendServer(tmp_path_factory.mktemp("e2e-accuracy"), env=_defaults_env(), auth=AUTH)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_served_pre_annotations_beat_pixels_and_logistic_regression(label_studio: LabelStudioServer,
                                                                    backend: BackendServer) -> None:
    images, labels = load_animal_mnist_arrays()
    train, test = _split(images, labels)
    pid = label_studio.create_project(animal_label_config(), title="taxomoco accuracy on defaults")
    order = train + test
    ids = label_studio.import_images(pid, {f"a{i:05d}.png": png_bytes(images[i]) for i in order})
    task_of = dict(zip(order, ids))
    label_studio.connect_backend(pid, backend.url, auth=AUTH)
    for i in train:
        path = animal_path(int(labels[i]))
        label_studio.annotate(task_of[i], taxonomy_result(path))
    held_out = {task_of[i]: animal_path(int(labels[i])) for i in test}

    client = LabelStudioClient(label_studio.url, label_studio.admin.token)

    def served() -> dict[int, tuple[str, ...]] | None:
        """The pre-annotation of the live version on every held-out task, once each holds one."""
        st = backend.job_status(pid)
        if st.get("queued") or st.get("running"):
            return None
        version = (st.get("last_success") or {}).get("version")
        trained_on = (((st.get("last_success") or {}).get("result") or {}).get("counts") or {}).get("trained_on", 0)
        if not version or trained_on < len(train):
            return None
        got = {}
        for task in client.iter_tasks(pid):
            preds = [p for p in task.predictions if p.get("model_version") == version]
            if task.id in held_out and preds and preds[0].get("result"):
                got[task.id] = tuple(preds[0]["result"][0]["value"]["taxonomy"][0])
        return got if len(got) == len(held_out) else None

    seen: dict[str, dict[int, tuple[str, ...]] | None] = {}

    def complete() -> bool:
        seen["p"] = served()
        return seen["p"] is not None

    assert wait_until(complete, 600, interval_s=5.0), (
        f"no complete pre-annotation of the held-out tasks; job status {backend.job_status(pid)}\n{backend.log()[-5000:]}")
    predictions = seen["p"]
    assert predictions is not None
    served_acc = float(np.mean([predictions[t][-1] == held_out[t][-1] for t in held_out]))

    # the trivial model a labeler would otherwise be better off with: pixels + logistic regression, same labels
    x_train = images[train].reshape(len(train), -1).astype(np.float32) / 255.0
    x_test = images[test].reshape(len(test), -1).astype(np.float32) / 255.0
    scaler = StandardScaler().fit(x_train)
    logreg = LogisticRegression(max_iter=5000).fit(scaler.transform(x_train), labels[train])
    pixel_acc = float(np.mean(logreg.predict(scaler.transform(x_test)) == labels[test]))

    last = backend.job_status(pid)["last_success"]["result"]
    print(f"served leaf accuracy {served_acc:.3f} vs pixels+logreg {pixel_acc:.3f}; model: "
          f"{last.get('model_choice') or last.get('pretrain')}")
    assert served_acc >= pixel_acc, (served_acc, pixel_acc, last)
