"""How fast does bulk pre-annotation write a version's predictions into Label Studio? (``ml_backend.prelabel``)

A real Label Studio server (started here, as the test suite does) holds ``--tasks`` image tasks of the animal-mnist
taxonomy. A model version is published with untrained weights (the write path does not depend on their quality),
and every task's embedding is put into the project's embedding cache, as a training run leaves it. Then the
product's own run, :func:`ml_backend.prelabel.writer.run_prelabel`, writes the predictions of every task (read
from the task snapshot of a real pull, predicted from the cache, ranked, the "label next" tab updated, chunked
imports, the pin), once per ``--chunks`` size on a fresh version. Baseline in the same run: one
``POST /api/predictions/`` per task (what a backend without bulk import does), on ``--baseline-tasks`` tasks.

The 100k figure is a linear **extrapolation** of the measured rate, not a measurement: Label Studio's SQLite
inserts and the per-task checks may slow down as the tables grow.

Usage:
    python bench/labeling_session.py [--tasks 1000] [--chunks 100 500] [--baseline-tasks 100]
        [--out bench/results/labeling_session.txt]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: run from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.datasets import ANIMAL_TAXONOMY, ANIMAL_TAXONOMY_TREE  # noqa: E402
from ml_backend.labelstudio import predictions as ls_predictions  # noqa: E402
from ml_backend.labelstudio.client import LabelStudioClient  # noqa: E402
from ml_backend.labelstudio.snapshot import pull_tasks  # noqa: E402
from ml_backend.net.images import ImageFetcher  # noqa: E402
from ml_backend.prelabel.writer import run_prelabel  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from model.atomic import atomic_write_json  # noqa: E402
from model.bundle import publish  # noqa: E402
from model.encoder.backbone import build_backbone  # noqa: E402
from model.encoder.cache import EmbeddingCache  # noqa: E402
from model.encoder.config import EncoderConfig  # noqa: E402
from model.heads.heads import TaxonomyHeads  # noqa: E402
from tests.servers import LabelStudioServer, label_studio_binary  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--baseline-tasks", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/labeling_session.txt"))
    args = parser.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
