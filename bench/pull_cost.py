"""What an incremental task pull costs against a real Label Studio: the product's read vs one without predictions.

Per size (``--sizes``, default 1,000 and 10,000 tasks), in one Label Studio 1.23 (SQLite, the linear prediction
import flag on, as ``bench/retrain_latency.py`` starts it):

1. a project of N image tasks (``--unique`` distinct animal-mnist PNGs, repeated), 20% labelled, every task holding
   bulk predictions of 2 model versions (what the backend leaves on them: the live and the previous version);
2. a full pull into a snapshot (the product's ``pull_tasks``), then ``--changed`` tasks annotated through the API,
   half of them from the live version's prediction (``parent_prediction`` set, as the labeling UI does);
3. ``--rounds`` rounds, the variants alternating (order flipped every round), each starting from a copy of the
   snapshot of step 2 and running the product's ``pull_tasks`` (count, incremental read, merge, atomic write):
   - ``former`` (the product's): task pages of 50 with every prediction (``GET /api/projects/<id>/tasks/``), stripped locally to
     the parent predictions;
   - ``omit predictions`` (the candidate, :func:`omit_read`): the same pages with ``omit=predictions``, then the
     parent predictions one by one (``GET /api/predictions/<id>/``).
   Both must give the same tasks (ids, data, annotations, parent predictions) as each other and as a full read.

Result (``bench/results/pull_cost.txt``): the candidate is slower at both sizes, because Label Studio's page costs
about the same without its predictions and every parent prediction is one more request; the product's pull stays.

Usage: ``nice .venv/bin/python bench/pull_cost.py [--sizes 1000 10000] [--rounds 7] [--out ...]``. Needs Label
Studio in ``.ls-venv`` and ``pip install --no-deps animal-mnist==0.4``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.datasets import animal_label_config, load_animal_mnist, png_bytes, taxonomy_result  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from bench.retrain_latency import LS_FLAG  # noqa: E402
from ml_backend.labelstudio import snapshot  # noqa: E402
from ml_backend.labelstudio.client import LabelStudioClient  # noqa: E402
from ml_backend.labelstudio.predictions import IMPORT_CHUNK_MAX, import_predictions  # noqa: E402
from ml_backend.labelstudio.tasks import TaskRecord  # noqa: E402
from tests.servers import LabelStudioServer, label_studio_binary  # noqa: E402

VERSIONS = ("20261128T100000-aaaaaa", "20261128T110000-bbbbbb")
"""The previous and the live version of the bulk predictions on every task."""

def omit_read(client: LabelStudioClient, project_id: int, since: str) -> list[TaskRecord]:
    """The candidate: the same pages without predictions (``omit=predictions``, drf-flex-fields on Label Studio's
    ``TaskSimpleSerializer``), then each parent prediction by id (``GET /api/predictions/<id>/``)."""
    tasks = []
    page = 1
    since_at = snapshot._parse(since)
    while True:
        answer = client.request("GET", f"/api/projects/{project_id}/tasks/", "list changed tasks",
                                params={"page": page, "page_size": snapshot.INCREMENTAL_PAGE_SIZE,
                                        "omit": "predictions"}).json()
        assert all("predictions" not in t for t in answer), "omit=predictions was ignored"
        done = len(answer) < snapshot.INCREMENTAL_PAGE_SIZE
        for t in answer:
            if snapshot._parse(t["updated_at"]) <= since_at:
                done = True
                break
            tasks.append(t)
        if done:
            break
        page += 1
    wanted = sorted({a["parent_prediction"] for t in tasks for a in t["annotations"] if a.get("parent_prediction")})
    found = [client.request("GET", f"/api/predictions/{i}/", "read a parent prediction").json() for i in wanted]
    by_task: dict[int, list[dict[str, Any]]] = {}
    for p in found:
        by_task.setdefault(int(p["task"]), []).append({"id": p["id"], "result": p["result"]})
    return [TaskRecord(int(t["id"]), dict(t["data"]), [dict(a) for a in t["annotations"]], by_task.get(t["id"], []),
                       str(t["updated_at"])) for t in tasks]


class OmitClient(LabelStudioClient):
    """The product's client whose incremental task list (``updated_after`` given) is :func:`omit_read`: the
    product's ``pull_tasks`` runs unchanged on it (its local strip keeps these parent predictions)."""

    def iter_tasks(self, project_id: int, page_size: int = 500,
                   updated_after: str | None = None) -> Iterator[TaskRecord]:
        if updated_after is None:
            return super().iter_tasks(project_id, page_size)
        return iter(omit_read(self, project_id, updated_after))


VARIANTS: dict[str, type[LabelStudioClient]] = {"former": LabelStudioClient, "omit predictions": OmitClient}


def build(ls: LabelStudioServer, n: int, unique: int, changed: int, seed: int) -> tuple[int, list[int]]:
    """The project of step 1; returns its id and the ids of the tasks to annotate in step 2."""
    rng = np.random.default_rng(seed)
    pid = ls.create_project(animal_label_config(), title=f"pull cost {n}")
    folder = ls.files_root / "animal"
    folder.mkdir(parents=True, exist_ok=True)
    ls.api("POST", "/api/storages/localfiles", json={"project": pid, "path": str(folder), "title": "animal",
                                                     "use_blob_urls": False})
    images, paths = load_animal_mnist()  # (10000, 28, 28) uint8, a taxonomy path per image
    picks = rng.permutation(len(images))[:unique]
    for i in picks:
        (folder / f"{int(i):05d}.png").write_bytes(png_bytes(images[i]))
    tasks: list[dict[str, Any]] = []
    for k in range(n):
        i = int(picks[k % unique])
        task: dict[str, Any] = {"data": {"image": f"/data/local-files/?d=animal/{i:05d}.png"}}
        if k % 5 == 0:
            task["annotations"] = [{"result": taxonomy_result(tuple(paths[i])), "completed_by": ls.admin.id}]
        tasks.append(task)
    ids: list[int] = []
    for b in range(0, n, 1000):
        ids += ls.import_tasks(pid, tasks[b:b + 1000])
    leaves = sorted({tuple(p) for p in paths})
    client = LabelStudioClient(ls.url, ls.admin.token)
    try:
        for version in VERSIONS:
            items = [{"task": t, "result": taxonomy_result(leaves[int(rng.integers(len(leaves)))]), "score": 0.5,
                      "model_version": version} for t in ids]
            for b in range(0, n, IMPORT_CHUNK_MAX):
                import_predictions(client, pid, items[b:b + IMPORT_CHUNK_MAX])
    finally:
        client.close()
    unlabelled = [t for k, t in enumerate(ids) if k % 5]
    return pid, [int(t) for t in rng.choice(unlabelled, size=changed, replace=False)]


def records(tasks: list[TaskRecord]) -> str:
    """The tasks as comparable text; without ``created_ago`` (Label Studio's "0 minutes": it moves with the clock)."""
    rows = [snapshot._as_dict(t) for t in sorted(tasks, key=lambda t: t.id)]
    for row in rows:
        row["annotations"] = [{k: v for k, v in a.items() if k != "created_ago"} for a in row["annotations"]]
    return json.dumps(rows, sort_keys=True)


def difference(tasks: list[TaskRecord], truth: str) -> str:
    """Which tasks differ between a pull and a full read (ids missing, doubled, or with other content)."""
    mine = {t["id"]: t for t in json.loads(records(tasks))}
    full = json.loads(truth)
    theirs = {t["id"]: t for t in full}
    doubled = len(full) - len(theirs), len(tasks) - len(mine)
    other = [i for i in mine.keys() & theirs.keys() if mine[i] != theirs[i]]
    return (f"{len(mine.keys() - theirs.keys())} only in the pull, {len(theirs.keys() - mine.keys())} only in the "
            f"full read, doubled ids (full read, pull) {doubled}, {len(other)} differ, e.g. "
            + json.dumps([(mine[i], theirs[i]) for i in other[:1]])[:1500])


def one_size(n: int, args: argparse.Namespace, work: Path) -> list[str]:
    ls = LabelStudioServer(work / f"ls{n}", label_studio_binary(), env={LS_FLAG: "true"})
    print(f"N={n}: starting Label Studio ...", flush=True)
    ls.start(timeout_s=600)
    try:
        t0 = time.monotonic()
        pid, picked = build(ls, n, args.unique, args.changed, args.seed)
        built_s = time.monotonic() - t0
        time.sleep(snapshot.OVERLAP_S + 1)  # else the incremental pulls re-read the whole set-up (overlap)
        config = animal_label_config()
        client = LabelStudioClient(ls.url, ls.admin.token)
        base = work / f"snapshot{n}.json"
        first = snapshot.pull_tasks(client, pid, base, config, 3600.0)
        assert first.kind is snapshot.PullKind.FULL and len(first.tasks) == n, first.kind
        time.sleep(1.1)  # Label Studio's clock (HTTP Date) has whole seconds
        from_prediction = 0
        for k, t in enumerate(picked):
            task = ls.task(t)
            live = [p for p in task["predictions"] if p["model_version"] == VERSIONS[1]]
            if k % 2 == 0:
                ls.annotate(t, live[0]["result"], parent_prediction=live[0]["id"])
                from_prediction += 1
            else:
                ls.annotate(t, live[0]["result"])  # typed without the prediction
        truth = records([snapshot._stripped(t) for t in client.iter_tasks(pid)])  # a full read
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        reads: dict[str, set[int]] = {name: set() for name in VARIANTS}
        clients = {name: cls(ls.url, ls.admin.token) for name, cls in VARIANTS.items()}
        try:
            for r in range(args.rounds):
                order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
                for name in order:
                    path = work / f"round{n}.json"
                    shutil.copyfile(base, path)
                    t1 = time.perf_counter()
                    pull = snapshot.pull_tasks(clients[name], pid, path, config, 3600.0)
                    times[name].append(time.perf_counter() - t1)
                    assert pull.kind is snapshot.PullKind.INCREMENTAL, (name, pull.reason)
                    got = records(pull.tasks)
                    if got != truth:
                        raise AssertionError(f"{name}: the pulled tasks differ from a full read: "
                                             + difference(pull.tasks, truth))
                    reads[name].add(pull.read)
        finally:
            for c in clients.values():
                c.close()
        parents = sum(1 for t in json.loads(truth) for p in t["predictions"])
        client.close()
    finally:
        ls.stop()
    lines = [f"## {n:,} tasks", "",
             f"Set-up: {n} tasks ({n // 5} labelled), {len(VERSIONS) * n} bulk predictions ({len(VERSIONS)} versions "
             f"on every task), built in {built_s:.0f} s; then {args.changed} tasks annotated ({from_prediction} "
             f"from the live prediction); {parents} parent predictions in the project; product OVERLAP_S="
             f"{snapshot.OVERLAP_S:g}, INCREMENTAL_PAGE_SIZE={snapshot.INCREMENTAL_PAGE_SIZE}.",
             "Both variants returned the same tasks as a full read in every round (ids, data, annotations but their "
             "relative `created_ago`, parent predictions).", "",
             "| incremental pull (`pull_tasks`, whole) | tasks read | median s | min s | max s | rounds |",
             "|---|---|---|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {'/'.join(str(x) for x in sorted(reads[name]))} | {statistics.median(ts):.3f} | "
                     f"{min(ts):.3f} | {max(ts):.3f} | {len(ts)} |")
    ratio = statistics.median(times["former"]) / statistics.median(times["omit predictions"])
    lines += ["", f"former / omit predictions (medians): {ratio:.2f}x. Rounds, s: "
              + "; ".join(f"{name}: {', '.join(f'{x:.2f}' for x in ts)}" for name, ts in times.items()), "",
              load_line(f"after {n:,} tasks"), ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--changed", type=int, default=20, help="tasks annotated after the full pull")
    ap.add_argument("--unique", type=int, default=200, help="distinct images (repeated over the tasks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pull_cost.txt")
    args = ap.parse_args()
    lines = header("Incremental task pull: whole tasks vs omit=predictions (bench/pull_cost.py)")
    lines += [f"Label Studio 1.23 (SQLite) environment: {LS_FLAG}=true. Goal (issue 14): the pull's share of a "
              "retrain (annotation -> new version p95 < 10 s) as small as Label Studio allows.", ""]
    with tempfile.TemporaryDirectory(prefix="taxomoco-pull-") as tmp:
        for n in args.sizes:
            lines += one_size(n, args, Path(tmp))
            write_result(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
