"""Incremental task pulls against a real Label Studio: the merged copy always equals a full pull."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.snapshot import INCREMENTAL_PAGE_SIZE, PullKind, pull_tasks
from ml_backend.paths import ProjectPaths
from tests.servers import TWO_LEVEL_CONFIG, LabelStudioServer

pytestmark = pytest.mark.e2e

HOUR = 3600.0
OVERLAP = 0.0  # seconds re-read before the newest change; the product's 10 s would re-read all of this fast test


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * i, 200 - 10 * i, 50)).save(buf, "PNG")
    return buf.getvalue()


def result(*path: str) -> list[dict]:
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def full(client: LabelStudioClient, pid: int) -> list[tuple[int, list]]:
    """What a full pull sees: (task id, annotation ids and results) per task."""
    tasks = sorted(client.iter_tasks(pid), key=lambda t: t.id)
    return [(t.id, sorted((a["id"], json.dumps(a["result"])) for a in t.annotations)) for t in tasks]


def seen(tasks) -> list[tuple[int, list]]:
    return [(t.id, sorted((a["id"], json.dumps(a["result"])) for a in t.annotations)) for t in tasks]


@pytest.fixture
def project(label_studio: LabelStudioServer) -> tuple[int, list[int]]:
    pid = label_studio.create_project(TWO_LEVEL_CONFIG, title="snapshot test project")
    ids = label_studio.import_images(pid, {f"s{i}.png": png(i) for i in range(6)})
    label_studio.annotate(ids[0], result("Animal", "Cat"))
    return pid, ids


def test_incremental_pulls_equal_full_pulls_through_every_kind_of_change(
        label_studio: LabelStudioServer, project: tuple[int, list[int]], tmp_path: Path) -> None:
    pid, ids = project
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    path = ProjectPaths(tmp_path, 1).tasks_snapshot
    time.sleep(1.1)  # Label Studio's clock (HTTP Date) has whole seconds: the set-up lies in an earlier one
    first = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert first.kind is PullKind.FULL and first.read == 6 and seen(first.tasks) == full(client, pid)
    assert all(t.predictions == [] for t in first.tasks)

    unchanged = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert unchanged.kind is PullKind.INCREMENTAL and seen(unchanged.tasks) == full(client, pid)
    assert unchanged.read == 0  # nothing changed: nothing read but the count
    window = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, overlap_s=60.0)
    assert window.kind is PullKind.INCREMENTAL and window.read == 6  # the last minute's changes are read again
    assert json.loads(path.read_text())["pulled_at"].endswith("Z")

    created = label_studio.annotate(ids[3], result("Plant", "Tree"))
    step = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert step.kind is PullKind.INCREMENTAL and seen(step.tasks) == full(client, pid)
    assert step.read == 1 and any(a["id"] == created for t in step.tasks for a in t.annotations)

    label_studio.api("PATCH", f"/api/annotations/{created}/", json={"result": result("Plant", "Flower")})
    step = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert step.kind is PullKind.INCREMENTAL and seen(step.tasks) == full(client, pid)
    assert "Flower" in json.dumps([t.annotations for t in step.tasks if t.id == ids[3]])

    label_studio.api("DELETE", f"/api/annotations/{created}/")
    step = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert step.kind is PullKind.INCREMENTAL and seen(step.tasks) == full(client, pid)
    assert next(t for t in step.tasks if t.id == ids[3]).annotations == []

    new = label_studio.import_images(pid, {"new.png": png(9)})[0]
    step = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert step.kind is PullKind.INCREMENTAL and new in [t.id for t in step.tasks]
    assert seen(step.tasks) == full(client, pid)

    label_studio.api("DELETE", f"/api/tasks/{ids[5]}/")
    step = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert step.kind is PullKind.FULL and "deleted" in step.reason
    assert seen(step.tasks) == full(client, pid) and ids[5] not in [t.id for t in step.tasks]


def test_an_incremental_pull_reads_changes_spanning_several_of_its_small_pages(
        label_studio: LabelStudioServer, tmp_path: Path) -> None:
    pid = label_studio.create_project(TWO_LEVEL_CONFIG, title="snapshot pages")
    n = 2 * INCREMENTAL_PAGE_SIZE + 5
    ids = label_studio.import_tasks(pid, [{"data": {"image": f"/data/upload/x/{i}.png"},
                                           "annotations": [{"result": result("Animal", "Cat" if i % 2 else "Dog")}]}
                                          for i in range(n)])
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    path = ProjectPaths(tmp_path, 1).tasks_snapshot
    assert pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP).kind is PullKind.FULL
    window = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, overlap_s=60.0)  # every task changed within it
    assert window.kind is PullKind.INCREMENTAL and window.read == n == len(ids)  # three pages of the small size
    assert seen(window.tasks) == full(client, pid)


def test_full_pull_on_config_change_age_and_a_corrupt_copy(
        label_studio: LabelStudioServer, project: tuple[int, list[int]], tmp_path: Path) -> None:
    pid, _ = project
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    path = ProjectPaths(tmp_path, 1).tasks_snapshot
    assert pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP).kind is PullKind.FULL
    changed = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG.replace("Tree", "Shrub"), HOUR)
    assert changed.kind is PullKind.FULL and "label config" in changed.reason
    time.sleep(0.2)
    old = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG.replace("Tree", "Shrub"), 0.1)
    assert old.kind is PullKind.FULL and "TASKS_FULL_PULL_EVERY_S" in old.reason
    path.write_text('{"format": 1, "tasks": [{"id": "x"}], "newest": "2026-01-01T00:00:00Z"}')
    broken = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
    assert broken.kind is PullKind.FULL and seen(broken.tasks) == full(client, pid)
    for key, value in (("full_at", "soon"), ("full_at", None), ("tasks", [{"id": 1, "data": {}, "annotations": "ab",
                                                                         "updated_at": ""}])):
        valid = json.loads(path.read_text())  # a copy that is right but for one field
        path.write_text(json.dumps({**valid, key: value}))
        tampered = pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP)
        assert tampered.kind is PullKind.FULL and seen(tampered.tasks) == full(client, pid), key
    path.write_text("{not json")
    assert pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP).kind is PullKind.FULL
    assert pull_tasks(client, pid, path, TWO_LEVEL_CONFIG, HOUR, OVERLAP).kind is PullKind.INCREMENTAL
