"""LabelStudioClient against a real Label Studio server (started by the suite)."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
import requests
from PIL import Image

from ml_backend.labelstudio import comments, tabs
from ml_backend.labelstudio.auth import TokenKind
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import (
    LabelStudioAuthError,
    LabelStudioError,
    LabelStudioNotFound,
    LabelStudioUnreachable,
    NotSupportedByServer,
)
from ml_backend.labelstudio.tasks import TaskRecord
from model.errors import ConfigError
from tests.servers import TWO_LEVEL_CONFIG, LabelStudioServer, free_port

pytestmark = pytest.mark.e2e

TAXONOMY_CONFIG = TWO_LEVEL_CONFIG


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def taxonomy_result(*path: str) -> list[dict]:
    return [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy", "value": {"taxonomy": [list(path)]}}]


def fake_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{base64.urlsafe_b64encode(b'sig').decode().rstrip('=')}"


@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer) -> dict:
    """A project with 5 uploaded images, annotated by two annotators (one skip, one ground truth)."""
    ls = label_studio
    pid = ls.create_project(TAXONOMY_CONFIG, title="client test project")
    images = {f"img{i}.png": png((40 * i, 255 - 40 * i, 7 * i)) for i in range(5)}
    task_ids = ls.import_images(pid, images)
    alice = ls.create_user("alice@taxomoco.test")
    bob = ls.create_user("bob@taxomoco.test")
    submitted = {
        (task_ids[0], alice.id): ("Animal", "Cat"),
        (task_ids[0], bob.id): ("Animal", "Dog"),
        (task_ids[1], alice.id): ("Plant", "Tree"),
        (task_ids[1], bob.id): ("Plant", "Tree"),
        (task_ids[2], bob.id): ("Plant", "Flower"),
    }
    for (tid, uid), path in submitted.items():
        ls.annotate(tid, taxonomy_result(*path), user=alice if uid == alice.id else bob,
                    ground_truth=(tid == task_ids[2]))
    ls.annotate(task_ids[3], [], user=alice, was_cancelled=True)
    return {"id": pid, "task_ids": task_ids, "images": list(images.values()), "alice": alice, "bob": bob,
            "submitted": submitted}


def test_get_project_returns_the_label_config(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    info = client.get_project(project["id"])
    assert info.id == project["id"]
    assert info.title == "client test project"
    assert '<Choice value="Flower"/>' in info.label_config
    assert client.token_kind is TokenKind.LEGACY


def test_iter_tasks_returns_every_annotation_of_every_annotator(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    tasks = list(client.iter_tasks(project["id"], page_size=2))  # 3 pages
    assert sorted(t.id for t in tasks) == project["task_ids"]  # newest change first
    assert all(isinstance(t, TaskRecord) for t in tasks)
    assert all(t.data["image"].startswith("/data/upload/") for t in tasks)

    pulled = {}
    for task in tasks:
        for ann in task.annotations:
            assert {"id", "completed_by", "result", "was_cancelled", "ground_truth", "updated_at"} <= set(ann)
            if not ann["was_cancelled"]:
                pulled[(task.id, ann["completed_by"])] = tuple(ann["result"][0]["value"]["taxonomy"][0])
    assert pulled == project["submitted"]

    by_id = {t.id: t for t in tasks}
    skipped = by_id[project["task_ids"][3]].annotations
    assert [(a["completed_by"], a["was_cancelled"]) for a in skipped] == [(project["alice"].id, True)]
    assert [a["ground_truth"] for a in by_id[project["task_ids"][2]].annotations] == [True]
    assert by_id[project["task_ids"][4]].annotations == []
    # one page holding everything gives the same
    assert [t.annotations for t in client.iter_tasks(project["id"])] == [t.annotations for t in tasks]


def test_annotators_see_the_same_tasks_with_their_own_tokens(label_studio: LabelStudioServer, project: dict) -> None:
    bob = LabelStudioClient(label_studio.url, project["bob"].token)
    tasks = list(bob.iter_tasks(project["id"]))
    assert len(tasks) == 5
    assert sum(len(t.annotations) for t in tasks) == 6


def test_images_download_with_the_auth_headers(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    task = client.get_task(project["task_ids"][0])
    url = client.absolute_url(task.data["image"])
    assert url.startswith(label_studio.url + "/data/upload/") and client.is_own_url(url)
    answer = requests.get(url, headers=client.auth.headers(), timeout=30)
    assert answer.status_code == 200
    assert answer.content == project["images"][0]
    anonymous = requests.get(url, timeout=30, allow_redirects=False)
    assert anonymous.status_code in (401, 403)  # Label Studio's media needs the token


def test_absolute_url_keeps_other_schemes() -> None:
    client = LabelStudioClient("http://ls.example:8080/", "abc")
    assert client.absolute_url("/data/upload/1/a.png") == "http://ls.example:8080/data/upload/1/a.png"
    assert client.absolute_url("data/local-files/?d=x/y.png") == "http://ls.example:8080/data/local-files/?d=x/y.png"
    assert client.absolute_url("https://cdn.example/a.png") == "https://cdn.example/a.png"
    assert client.absolute_url("s3://bucket/a.png") == "s3://bucket/a.png"
    assert not client.is_own_url("http://ls.example:9090/x")


def test_personal_access_token_is_exchanged_and_renewed(label_studio: LabelStudioServer, project: dict) -> None:
    pat = label_studio.personal_access_token(project["alice"])
    client = LabelStudioClient(label_studio.url, pat)
    assert client.token_kind is TokenKind.PERSONAL_ACCESS
    first = client.auth.headers()["Authorization"]
    assert first.startswith("Bearer ") and pat not in first
    assert client.auth.headers()["Authorization"] == first  # cached
    assert sorted(t.id for t in client.iter_tasks(project["id"])) == project["task_ids"]
    assert client.get_project(project["id"]).id == project["id"]  # through the SDK
    image = client.get_task(project["task_ids"][1]).data["image"]
    assert requests.get(client.absolute_url(image), headers=client.auth.headers(), timeout=30).content == project["images"][1]

    client.auth._expires = time.time() + 30  # inside the renewal margin: the next call refreshes
    time.sleep(1.1)  # a new token differs by its issue time
    second = client.auth.headers()["Authorization"]
    assert second != first
    assert client.auth._expires > time.time() + 200  # a fresh 5-minute token
    client.auth._access = "garbage"  # a 401 renews the token once and retries
    client.auth._expires = time.time() + 3600
    assert len(list(client.iter_tasks(project["id"]))) == 5


def test_wrong_token_is_a_clear_error(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, "not-a-real-token")
    with pytest.raises(LabelStudioAuthError) as err:
        list(client.iter_tasks(project["id"]))
    message = str(err.value)
    assert label_studio.url in message and "401" in message and "LABEL_STUDIO_API_KEY" in message
    assert err.value.status == 401 and isinstance(err.value, ConfigError)
    with pytest.raises(LabelStudioAuthError, match="401"):
        client.get_project(project["id"])

    forged = fake_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "user_id": "1", "jti": "x"})
    with pytest.raises(LabelStudioAuthError, match="personal access token"):
        LabelStudioClient(label_studio.url, forged).auth.headers()


def test_unusable_keys_and_urls_are_rejected_up_front() -> None:
    expired = fake_jwt({"token_type": "refresh", "exp": int(time.time()) - 10})
    with pytest.raises(ConfigError, match="expired"):
        LabelStudioClient("http://localhost:8080", expired)
    access = fake_jwt({"token_type": "access", "exp": int(time.time()) + 100})
    with pytest.raises(ConfigError, match="personal access token"):
        LabelStudioClient("http://localhost:8080", access)
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient("http://localhost:8080", " ")
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL"):
        LabelStudioClient("localhost:8080", "abc")


def test_missing_project_and_unreachable_server(label_studio: LabelStudioServer) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    with pytest.raises(LabelStudioNotFound, match="404"):
        client.get_project(987654)
    dead = LabelStudioClient(f"http://127.0.0.1:{free_port()}", "abc", timeout=2)
    with pytest.raises(LabelStudioUnreachable, match="LABEL_STUDIO_URL") as err:
        list(dead.iter_tasks(1))
    assert err.value.status is None and isinstance(err.value, ConfigError)
    with pytest.raises(LabelStudioUnreachable):
        dead.get_project(1)


def test_comments_round_trip_or_clear_refusal(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    task_id = project["task_ids"][0]
    if comments.supports_comments(client):  # Label Studio Enterprise
        comment_id = comments.post_comment(client, project["id"], task_id, "annotators disagree at level 2")
        assert comment_id in [c["id"] for c in comments.list_comments(client, task_id)]
        comments.resolve_comment(client, comment_id)
        assert [c["is_resolved"] for c in comments.list_comments(client, task_id) if c["id"] == comment_id] == [True]
    else:  # Community: the comment API does not exist
        with pytest.raises(NotSupportedByServer, match="Enterprise"):
            comments.post_comment(client, project["id"], task_id, "annotators disagree")
        with pytest.raises(NotSupportedByServer):
            comments.list_comments(client, task_id)
        task = label_studio.task(task_id)
        assert task["comment_count"] == 0 and task["unresolved_comment_count"] == 0


def test_data_manager_tab_flags_exactly_the_given_tasks(label_studio: LabelStudioServer, project: dict) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    ids = project["task_ids"]
    tab = tabs.upsert_task_tab(client, project["id"], "taxomoco: disagreements", [ids[0], ids[2]])
    assert tabs.tab_task_ids(client, project["id"], tab) == [ids[0], ids[2]]
    assert tabs.upsert_task_tab(client, project["id"], "taxomoco: disagreements", [ids[4]]) == tab  # updated, not duplicated
    assert tabs.tab_task_ids(client, project["id"], tab) == [ids[4]]
    assert tabs.upsert_task_tab(client, project["id"], "taxomoco: disagreements", []) == tab
    assert tabs.tab_task_ids(client, project["id"], tab) == []
    annotator = LabelStudioClient(label_studio.url, project["bob"].token)
    titles = [t["data"]["title"] for t in tabs.list_tabs(annotator, project["id"])]
    assert titles.count("taxomoco: disagreements") == 1
    assert titles[0] == "Default"  # Label Studio's own tab stays the default: "Label All Tasks" is not ours
    ours = next(t for t in tabs.list_tabs(client, project["id"]) if t["data"]["title"] == "taxomoco: disagreements")
    assert "tasks:data.image" not in ours["data"]["hiddenColumns"]["explore"]  # thumbnails render


def test_errors_name_the_url(label_studio: LabelStudioServer) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.admin.token)
    with pytest.raises(LabelStudioError) as err:
        client.request("GET", "/api/tasks/99999999", "read task 99999999")
    assert err.value.url.startswith(label_studio.url) and err.value.status == 404


def test_image_fetching_renews_an_expired_or_refused_personal_access_token(label_studio: LabelStudioServer,
                                                                            project: dict, tmp_path) -> None:
    """A long image sync outlives Label Studio's 5-minute access tokens (their lifetime is not configurable in Label
    Studio): the fetcher's auth provider renews a token about to expire and one Label Studio refuses (401, once per
    request), and the downloads go on."""
    from ml_backend.net.images import ImageFetcher
    from ml_backend.settings import Settings

    client = LabelStudioClient(label_studio.url, label_studio.personal_access_token(project["alice"]))
    fetcher = ImageFetcher(Settings(model_dir=tmp_path), client)
    values = [client.get_task(t).data["image"] for t in project["task_ids"]]
    assert fetcher.fetch(values[0]) == project["images"][0]
    first = client.auth.headers()["Authorization"]
    client.auth._expires = time.time() - 1  # the access token expired during the sync
    time.sleep(1.1)  # a new token differs by its issue time
    assert fetcher.fetch(values[1]) == project["images"][1]
    assert client.auth.headers()["Authorization"] != first
    client.auth._access, client.auth._expires = "revoked", time.time() + 3600  # Label Studio refuses the one it has
    assert fetcher.fetch_many(values) == list(project["images"])
    assert client.auth.headers()["Authorization"] not in (first, "Bearer revoked")
    legacy = ImageFetcher(Settings(model_dir=tmp_path), LabelStudioClient(label_studio.url, "not-a-real-token"))
    with pytest.raises(Exception, match="HTTP 401"):  # a legacy token is not renewable: refused once, reported
        legacy.fetch(values[0])
