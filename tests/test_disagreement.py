"""Disagreement flags, annotator statistics, the report files, and the Label Studio side (real server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.labelstudio import flags as lsflags
from ml_backend.labelstudio import tabs as ls_tabs
from ml_backend.labelstudio.annotations import annotations_from_tasks
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.reports.disagreement_html import thumbnail_png, write_csvs, write_html
from ml_backend.reports.disagreements import run_cli
from ml_backend.settings import Settings
from ml_backend.training import disagreements as dis
from model.crowd.consensus import consensus
from model.crowd.findings import FlagKind
from model.crowd.report import result_to_json, review_list
from model.crowd.types import Annotation, ConsensusPolicy
from model.errors import DataError
from model.taxonomy import Taxonomy

TREE = Taxonomy.from_nested({"A": ["a1", "a2"], "B": ["b1", "b2"], "C": None})

TAXONOMY_XML = """<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image">
    <Choice value="Animal"><Choice value="Cat"/><Choice value="Dog" alias="dog"/></Choice>
    <Choice value="Plant"><Choice value="Tree"/><Choice value="Flower"/></Choice>
  </Taxonomy>
</View>"""

CHOICES_XML = """<View><Image name="img" value="$photo"/>
  <Choices name="kind" toName="img"><Choice value="Cat"/><Choice value="Dog"/></Choices></View>"""


def tax(*paths: tuple[str, ...], from_name: str = "taxonomy") -> list[dict]:
    return [{"from_name": from_name, "to_name": "image", "type": "taxonomy",
             "value": {"taxonomy": [list(p) for p in paths]}}]


def _scenario() -> list[Annotation]:
    """u3 confuses a1/a2; item 0 is a three-way split; item 1 a clear 2:1."""
    anns = [Annotation(0, "u1", (("A", "a1"),)), Annotation(0, "u2", (("B", "b1"),)), Annotation(0, "u3", (("C",),))]
    anns += [Annotation(1, "u1", (("A", "a1"),)), Annotation(1, "u2", (("A", "a1"),)), Annotation(1, "u3", (("A", "a2"),))]
    for i in range(2, 30):
        truth = [("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2"), ("C",)][i % 5]
        wrong = {("A", "a1"): ("A", "a2"), ("A", "a2"): ("A", "a1")}.get(truth, truth)
        anns += [Annotation(i, "u1", (truth,)), Annotation(i, "u2", (truth,)),
                 Annotation(i, "u3", (wrong if i % 2 == 0 else truth,))]
    return anns


# ----- flags and statistics (pure) ----------------------------------------------------------------------------
def test_flags_have_kind_level_and_rank_by_score() -> None:
    res = consensus(_scenario(), TREE, ConsensusPolicy())
    by_item: dict[int, set[FlagKind]] = {}
    for f in res.flags:
        by_item.setdefault(f.item, set()).add(f.kind)
    assert by_item[0] == {FlagKind.ANNOTATORS_DISAGREE, FlagKind.LOW_QUALITY_CONSENSUS}
    assert by_item[1] == {FlagKind.ANNOTATORS_DISAGREE}
    level = {(f.item, f.kind): f.level for f in res.flags}
    assert level[(0, FlagKind.ANNOTATORS_DISAGREE)] == 0 and level[(1, FlagKind.ANNOTATORS_DISAGREE)] == 1
    scores = [f.score for f in res.flags]
    assert scores == sorted(scores, reverse=True)
    review = review_list(res)
    assert review[0]["item"] == 0 and "low_quality_consensus" in review[0]["kinds"]
    assert [e["score"] for e in review] == sorted((e["score"] for e in review), reverse=True)
    assert review[0]["excluded"] and 0 in res.excluded and 1 in res.labels
    # The same finding has the same key on a later run (what keeps it from being posted twice).
    again = consensus(_scenario(), TREE, ConsensusPolicy())
    assert {f.key for f in again.flags} == {f.key for f in res.flags}


def test_annotator_stats_name_the_level_and_classes_of_disagreement() -> None:
    res = consensus(_scenario(), TREE, ConsensusPolicy())
    u3 = res.annotators["u3"]
    assert u3.n_labeled == 30 and u3.worst_level == 1
    assert {c[:2] for c in u3.confusions} <= {("A/a2", "A/a1"), ("A/a1", "A/a2"), ("C", "A"), ("A", "C")}
    assert u3.confusions[0][0] in ("A/a2", "A/a1") and u3.confusions[0][2] >= 3
    assert u3.quality < res.annotators["u1"].quality
    assert u3.agreement_with_consensus < 0.9 < res.annotators["u1"].agreement_with_consensus
    assert len(u3.level_accuracy) == 2 and u3.level_accuracy[1] < u3.level_accuracy[0]


def test_to_json_is_plain_json_with_summary_review_and_items() -> None:
    res = consensus(_scenario(), TREE, ConsensusPolicy(), level_probs={1: [np.ones(3) / 3, np.ones(5) / 5]})
    data = json.loads(json.dumps(result_to_json(res)))
    assert data["summary"]["items"] == 30 and data["summary"]["trained"] == len(res.labels)
    assert data["summary"]["flags"]["annotators_disagree"] >= 2 and data["summary"]["used_model"] is True
    assert data["policy"]["policy"]["min_quality"] == 0.6
    assert len(data["summary"]["quality_blend"]) == TREE.depth and all(0 <= b <= 1 for b in data["summary"]["quality_blend"])
    item0 = next(i for i in data["items"] if i["item"] == 0)
    assert item0["first_divergence"] == 0 and item0["pairwise_agreement"][0] == 0.0
    assert {g["annotator"] for g in item0["given"]} == {"u1", "u2", "u3"}
    assert data["annotators"][0]["annotator"] == "u3"  # lowest quality first


# ----- reading Label Studio annotations ----------------------------------------------------------------------
def test_annotations_from_tasks_reads_every_annotation_kind() -> None:
    config = parse_label_config(TAXONOMY_XML)
    tasks = [
        TaskRecord(1, {"image": "x"}, [
            {"id": 10, "completed_by": 5, "result": tax(("Animal",), ("Animal", "Cat"))},
            {"id": 11, "completed_by": {"id": 6, "email": "b@x"}, "result": tax(("Animal", "Dog"))},  # value of an alias
            {"id": 12, "completed_by": 7, "was_cancelled": True, "result": []},
            {"id": 13, "completed_by": 8, "ground_truth": True, "result": tax(("Plant", "Cactus"))},
            {"id": 14, "completed_by": 9, "result": tax(("Plant", "Tree")), "review_result": "accepted"},
        ]),
        {"id": 2, "data": {}, "annotations": [{"id": 15, "completed_by": 5, "was_cancelled": True, "result": []}]},
    ]
    anns, problems = annotations_from_tasks(tasks, config)
    got = {(a.item, a.annotator): a for a in anns}
    assert got[(1, "5")].paths == (("Animal", "Cat"),)
    assert got[(1, "6")].paths == (("Animal", "dog"),)
    assert got[(1, "7")].paths == () and got[(2, "5")].paths == ()
    assert got[(1, "8")].ground_truth and got[(1, "8")].paths == ()
    assert got[(1, "9")].reviewed and not got[(1, "9")].ground_truth
    assert len(problems) == 1 and "Cactus" in problems[0] and "annotation 13" in problems[0]
    res = consensus(anns, config.taxonomy, ConsensusPolicy())
    assert res.labels[1] == ("Plant", "Tree")  # the reviewed annotation takes precedence
    assert "cancelled" in res.excluded[2]


def test_annotations_from_tasks_with_flat_choices() -> None:
    config = parse_label_config(CHOICES_XML)
    result = [{"from_name": "kind", "to_name": "img", "type": "choices", "value": {"choices": ["Dog"]}}]
    anns, problems = annotations_from_tasks([{"id": 3, "annotations": [{"completed_by": 1, "result": result}]}], config)
    assert anns == [Annotation(3, "1", (("Dog",),))] and problems == []


# ----- report files -------------------------------------------------------------------------------------------
def _settings(tmp_path: Path, **over: object) -> Settings:
    return Settings.from_env(env={}, model_dir=tmp_path / "models", **over)


def test_report_is_saved_and_loaded_with_the_model_probabilities(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(DataError, match="taxomoco disagreements --project 4"):
        dis.load_report(settings.project(4))
    probs = {i: [np.full(3, 1 / 3), np.full(5, 0.2)] for i in range(30)}
    res = consensus(_scenario(), TREE, ConsensusPolicy(), level_probs=probs)
    dis.save_report(settings.project(4), res, model_version="v7", problems=["one problem"])
    report = dis.load_report(settings.project(4))
    assert report["project"] == 4 and report["model_version"] == "v7" and report["problems"][0] == "one problem"
    assert report == json.loads(json.dumps(dis.build_report(res, 4, "v7", ["one problem"])))
    loaded = dis.load_model_probs(settings.project(4))
    assert loaded is not None and sorted(loaded) == list(range(30))
    np.testing.assert_allclose(loaded[3][1], probs[3][1], rtol=1e-6)


def test_csv_and_html_files(tmp_path: Path) -> None:
    anns = _scenario() + [Annotation(0, "<script>x</script>", (("C",),))]
    report = dis.build_report(consensus(anns, TREE, ConsensusPolicy()), 9)
    files = write_csvs(report, tmp_path)
    assert sorted(f.name for f in files) == ["annotators.csv", "flags.csv", "items.csv", "review.csv"]
    review = (tmp_path / "review.csv").read_text().splitlines()
    assert review[0].startswith("rank,task,score") and review[1].startswith("1,0,")
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    png = thumbnail_png(img)
    assert max(Image.open(io.BytesIO(png)).size) == 96
    page = write_html(report, tmp_path / "report.html", {0: png}, task_url="http://ls/projects/9/data?task={task}")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1 and "http://ls/projects/9/data?task=0" in text
    assert "<script>x" not in text and "&lt;script&gt;" in text
    assert "held-out labels (level 0: " in text


def test_comment_markers_round_trip() -> None:
    res = consensus(_scenario(), TREE, ConsensusPolicy())
    flags = [f for f in res.flags if f.item == 0]
    text = lsflags.comment_text(flags)
    assert lsflags._keys_in([text, "unrelated comment"]) == {f.key for f in flags}
    assert all(f.message in text for f in flags)


# ----- against a real Label Studio ----------------------------------------------------------------------------
def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.e2e
def test_flags_reach_label_studio_and_the_cli_writes_the_report(label_studio, tmp_path: Path) -> None:
    ls = label_studio
    pid = ls.create_project(TAXONOMY_XML, title="disagreement test project")
    ids = ls.import_images(pid, {f"d{i}.png": _png((50 * i, 20, 200 - 40 * i)) for i in range(5)})
    ann1 = ls.create_user("ann1@taxomoco.test")
    ann2 = ls.create_user("ann2@taxomoco.test")
    plan = {ids[0]: (("Animal", "Cat"), ("Plant", "Tree")), ids[1]: (("Animal", "Cat"), ("Animal", "Cat")),
            ids[2]: (("Plant", "Flower"), ("Plant", "Tree")), ids[3]: (("Animal", "dog"), None)}
    for tid, (p1, p2) in plan.items():
        ls.annotate(tid, tax(p1), user=ann1)
        if p2:
            ls.annotate(tid, tax(p2), user=ann2)
    ls.annotate(ids[4], [], user=ann2, was_cancelled=True)

    settings = _settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.admin.token)
    summary = run_cli(settings, pid, None)
    out = Path(summary["out_dir"])
    assert out == settings.project(pid).disagreements
    assert {Path(f).name for f in summary["files"]} == {
        "report.json", "review.csv", "flags.csv", "items.csv", "annotators.csv", "report.html"}
    report = dis.load_report(settings.project(pid))
    assert report["summary"]["items"] == 5 and report["summary"]["items_with_disagreement"] == 2
    assert {e["item"] for e in report["review"]} == {ids[0], ids[2]}
    assert "cancelled" in report["excluded"][str(ids[4])]
    assert {a["annotator"] for a in report["annotators"]} == {str(ann1.id), str(ann2.id)}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # thumbnails fetched from Label Studio with the token

    client = LabelStudioClient(ls.url, ls.admin.token)
    tasks = list(client.iter_tasks(pid))
    anns, _ = annotations_from_tasks(tasks, parse_label_config(TAXONOMY_XML))
    res = consensus(anns, parse_label_config(TAXONOMY_XML).taxonomy, ConsensusPolicy())
    posted = lsflags.post_flags(settings.project(pid), client, res)
    tab = posted["tabs"]["taxomoco: annotators disagree"]
    assert ls_tabs.tab_task_ids(client, pid, tab) == sorted([ids[0], ids[2]])
    again = lsflags.post_flags(settings.project(pid), client, res)
    assert again["tabs"] == posted["tabs"]  # updated in place, never duplicated
    titles = [t["data"]["title"] for t in ls_tabs.list_tabs(client, pid)]
    assert titles.count("taxomoco: annotators disagree") == 1
    if posted["comments_supported"]:  # Label Studio Enterprise: each flag commented exactly once
        assert posted["comments_posted"] >= 1 and again["comments_posted"] == 0
    else:
        assert posted["comments_posted"] == 0


def test_http_endpoint_serves_the_saved_report(tmp_path: Path) -> None:
    import base64

    from ml_backend.http.app import create_app
    from ml_backend.queue.factory import make_scheduler
    from ml_backend.serving.store import ModelStore

    settings = _settings(tmp_path, basic_auth_user="u", basic_auth_pass="p")
    scheduler = make_scheduler(settings)
    store = ModelStore(settings)
    try:
        client = create_app(settings, scheduler=scheduler, store=store).test_client()
        assert client.get("/disagreements?project=5").status_code == 401  # project data: credentials first
        client.environ_base["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(b"u:p").decode()
        assert client.get("/disagreements").status_code == 400
        assert client.get("/disagreements?project=abc").status_code == 400
        missing = client.get("/disagreements?project=5")
        assert missing.status_code == 404 and "Train the project" in missing.get_json()["error"]
        res = consensus(_scenario(), TREE, ConsensusPolicy())
        dis.save_report(settings.project(5), res, model_version="v1")
        full = client.get("/disagreements?project=5.1712345678").get_json()
        assert full == dis.load_report(settings.project(5))
        short = client.get("/disagreements?project=5&limit=1").get_json()
        assert len(short["review"]) == 1 and len(short["items"]) == 1 and short["summary"] == full["summary"]
    finally:
        scheduler.close()
        store.close()
