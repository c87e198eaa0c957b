"""Annotations that merely copy a prediction are not trained on (unless TRAIN_ON_PREDICTION_COPIES) and are counted.

The rule on hand-made task records, then against a real Label Studio 1.23: its "Create annotations from
predictions" action, an unchanged pre-annotation submitted at once, one confirmed after a look, one corrected; the
real training job counts and leaves out the copies, remembers them after the clean-up deleted their predictions
(which clears ``parent_prediction``), and the bulk pre-annotation treats their tasks as unlabelled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.copies import CopyKind, find_copies, read_remembered, without_copies
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.predictions import delete_model_version, import_predictions
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.progress import read_progress
from ml_backend.training import jobs
from tests.servers import WARM_COLD_COLOURS, WARM_COLD_CONFIG
from tests.test_prelabel import _png, _result, _settings

RED, ORANGE, BLUE = ("Warm", "Red"), ("Warm", "Orange"), ("Cold", "Blue")


def _ann(aid: int, path: tuple[str, ...], parent: int | None = None, lead: float | None = None) -> dict:
    return {"id": aid, "completed_by": 1, "result": _result(path), "parent_prediction": parent, "lead_time": lead}


def test_the_rule_on_task_records() -> None:
    config = parse_label_config(WARM_COLD_CONFIG)
    pred = {"id": 7, "model_version": "v", "result": _result(RED), "score": 0.8}
    tasks = [
        TaskRecord(1, {}, [_ann(11, RED, parent=7)], [pred]),              # bulk action: no lead time
        TaskRecord(2, {}, [_ann(12, RED, parent=7, lead=0.4)], [pred]),    # submitted at once, unchanged
        TaskRecord(3, {}, [_ann(13, RED, parent=7, lead=6.0)], [pred]),    # confirmed after a look: human
        TaskRecord(4, {}, [_ann(14, BLUE, parent=7, lead=0.3)], [pred]),   # corrected: human
        TaskRecord(5, {}, [_ann(15, RED)], [pred]),                        # typed by a person: human
        TaskRecord(6, {}, [_ann(16, RED), _ann(17, RED, parent=7)], [pred]),
    ]
    found = find_copies(tasks, config, remembered={})
    assert found.kinds == {11: CopyKind.BULK, 12: CopyKind.QUICK, 17: CopyKind.BULK}
    kept = without_copies(tasks, found)
    assert [[a["id"] for a in t.annotations] for t in kept] == [[], [], [13], [14], [15], [16]]
    # the prediction was deleted (Label Studio cleared parent_prediction): remembered while unchanged
    later = [TaskRecord(1, {}, [_ann(11, RED)], []), TaskRecord(2, {}, [_ann(12, ORANGE)], [])]
    again = find_copies(later, config, remembered=found.paths)
    assert again.kinds == {11: CopyKind.REMEMBERED}  # 12 was edited by a person since: a human label now
    assert set(again.paths) == {11, 17}  # 17's task was not read this time: still remembered


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_copies_are_left_out_of_training_counted_and_remembered_after_their_predictions_are_deleted(
        label_studio, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco prediction copies")
    leaves = list(WARM_COLD_COLOURS)
    ids = label_studio.import_images(pid, {f"c{i:02d}.png": _png(WARM_COLD_COLOURS[leaves[i % 3]], seed=200 + i)
                                           for i in range(15)})
    for i, tid in enumerate(ids[:6]):  # 2 human labels per class
        label_studio.annotate(tid, _result(leaves[i % 3]))
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    other = "20200101T000000-abcdef"  # an older version of ours, predicting "Blue" everywhere
    import_predictions(client, pid, [{"task": t, "result": _result(BLUE), "score": 0.9, "model_version": other}
                                     for t in ids[6:]])
    preds = {t: label_studio.task(t)["predictions"][0]["id"] for t in ids[6:]}
    action = label_studio.api("POST", "/api/dm/actions", params={"id": "predictions_to_annotations", "project": pid},
                              json={"selectedItems": {"all": False, "included": ids[6:9]}, "model_version": other})
    assert "Created 3 annotations" in action.json()["detail"]
    label_studio.annotate(ids[9], _result(BLUE), parent_prediction=preds[ids[9]], lead_time=0.3)   # at once
    label_studio.annotate(ids[10], _result(BLUE), parent_prediction=preds[ids[10]], lead_time=5.0)  # looked
    label_studio.annotate(ids[11], _result(RED), parent_prediction=preds[ids[11]], lead_time=0.5)   # corrected
    paths = ProjectPaths(tmp_path, pid)

    def train(**overrides: object) -> dict:
        jobs.use_settings(_settings(tmp_path, label_studio, **overrides))
        try:
            result = jobs.train_project(pid, str(tmp_path))
        finally:
            jobs.use_settings(None)
        assert result["status"] == "succeeded", result
        return result["counts"]

    counts = train()
    assert counts["prediction_copies"] == 4 and counts["prediction_copies_excluded"] == 4, counts
    assert counts["prediction_copies_bulk"] == 3 and counts["prediction_copies_quick"] == 1, counts
    assert counts["labelled"] == 8, counts  # 6 typed + the confirmed one + the corrected one
    copy_tasks = set(ids[6:10])
    remembered = read_remembered(paths.prediction_copies)
    assert len(remembered) == 4
    progress = read_progress(paths)
    assert progress is not None and progress.total == 15 - 8  # the copies' tasks are pre-annotated again
    assert all(any(p["model_version"] == progress.version for p in label_studio.task(t)["predictions"])
               for t in copy_tasks)

    # the predictions they copied are deleted (Label Studio clears parent_prediction); a full pull still knows
    delete_model_version(client, pid, other)
    assert all(a["parent_prediction"] is None for t in copy_tasks for a in label_studio.task(t)["annotations"])
    paths.tasks_snapshot.unlink()  # the next pull reads every task again
    counts = train()
    assert counts["prediction_copies"] == 4 and counts["prediction_copies_remembered"] == 4, counts
    assert counts["labelled"] == 8, counts

    # the setting trains on them
    counts = train(train_on_prediction_copies=True)
    assert counts["prediction_copies"] == 4 and counts["prediction_copies_excluded"] == 0, counts
    assert counts["labelled"] == 12, counts
