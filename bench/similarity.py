"""Similar-image search and near-duplicates: the product's kNN index against brute-force numpy, and the
near-duplicate detector against exact hashing and pixel-space similarity, side by side in one run.

Part 1 (speed, synthetic vectors of the real embedding dimension, 512 for ResNet-18): for 10k, 100k and 1M
vectors, ``model.neighbors.index.NeighborIndex`` (faiss ``IndexFlatIP``) vs a brute-force numpy scan
(``base @ q`` + ``argpartition``): build time, single-query latency p50/p95, recall@10 of ours against the numpy
answer, memory; plus the cost of the near-duplicate pair search (full at 10k, incremental 1k-into-100k). One
thread each (faiss OpenMP and numpy's BLAS), as on a shared 2-core machine. The vectors are a mixture of
Gaussian clusters (like embeddings of a few classes), not uniform noise.

Part 2 (near-duplicates, animal-mnist): 10,000 real images embedded by a MoCo v2 encoder pretrained on them
(``taxomoco pretrain`` on the product's defaults, its default 20-minute budget unless ``--pretrain-minutes``, kept in
``--encoder``; an existing encoder there is reused), with
500 injected copies of each kind — exact, 1-2 px crop resized back, horizontal flip, JPEG quality 75 — of
random originals. The threshold is calibrated on half of the originals (copies of those as positives, each
image's most similar distinct image as negatives, at most 0.5 % of negatives above it:
``model.neighbors.duplicates.calibrate_threshold``) and evaluated on the whole set with the product's grouping
(``duplicate_groups``): pair precision, and recall per copy kind on the held-out half. Baselines in the same
run: exact content hash only, and cosine similarity of raw pixels with a threshold calibrated the same way. The
product's default, the automatic threshold (``model.neighbors.duplicates.auto_threshold``), is computed as a training
computes it: on the index of all images, copies included, knowing none of them (500 copies of each kind are far more
than the 0.5 % of images the rule's quantile allows for: there the cap decides; ``--copies 25`` is a project with
few copies); for pixels too (without the cap's meaning: it is set for MoCo embeddings).

Run: ``nice python bench/similarity.py`` (about 10 minutes on a shared 2-core machine; ``--sizes`` and
``--queries`` shorten it). Writes ``bench/results/similarity.txt``.
"""

from __future__ import annotations

import os

# one BLAS thread for the numpy baseline, set before numpy loads its BLAS (faiss gets omp_set_num_threads below)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(ROOT))

from bench.datasets import load_animal_mnist  # noqa: E402
from bench.labeling_session import pretrain_encoder  # noqa: E402
from bench.provenance import header, load_line  # noqa: E402
from ml_backend.encoder_dir import load_encoder  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from model.encoder.backbone import build_backbone  # noqa: E402
from model.encoder.embedder import Embedder  # noqa: E402
from model.neighbors import AUTO_THRESHOLD_CAP  # noqa: E402
from model.neighbors.duplicates import auto_threshold, calibrate_threshold, duplicate_groups, near_pairs  # noqa: E402
from model.neighbors.index import NeighborIndex  # noqa: E402
from model.neighbors.vectors import normalise  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "similarity.txt"
ENCODER = ROOT / "bench" / "out" / "similarity-encoder"
KINDS = ("exact", "crop", "flip", "jpeg")
MAX_FALSE_POSITIVE_RATE = 0.005
SWEEP = (0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9996)
"""Fixed thresholds also reported (the precision/recall trade-off around the calibrated one; 0.9996 was the fixed
default before the threshold was calibrated per encoder)."""


# ----- part 1: speed ---------------------------------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def clustered(n: int, dim: int, seed: int, clusters: int = 64) -> np.ndarray:
    """``(n, dim)`` float32 vectors around ``clusters`` random centres (generated in chunks to bound memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        out[lo:hi] = centres[rng.integers(0, clusters, hi - lo)] + 0.8 * rng.normal(size=(hi - lo, dim))
    return out


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1000.0, q))


def speed_row(n: int, dim: int, queries: int, k: int = 10) -> dict:
    base = clustered(n, dim, seed=n)
    qs = clustered(queries, dim, seed=n + 1)
    keys = [f"{i:x}" for i in range(n)]
    rss0 = rss_mib()
    t0 = time.perf_counter()
    index = NeighborIndex.build(keys, base)
    build_s = time.perf_counter() - t0
    ours_mib = rss_mib() - rss0
    ours_t, ours_rows = [], []
    for q in qs:
        t = time.perf_counter()
        _, rows = index.search(q[None, :], k)
        ours_t.append(time.perf_counter() - t)
        ours_rows.append(rows[0])
    # the baseline: unit rows in one numpy matrix, one matrix-vector product + argpartition per query
    rss1 = rss_mib()
    t0 = time.perf_counter()
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    numpy_build_s = time.perf_counter() - t0
    numpy_mib = rss_mib() - rss1
    del base
    np_t, recalls = [], []
    for q, mine in zip(qs, ours_rows):
        t = time.perf_counter()
        s = unit @ (q / np.linalg.norm(q))  # (N,)
        top = np.argpartition(-s, k)[:k]
        top = top[np.argsort(-s[top])]
        np_t.append(time.perf_counter() - t)
        recalls.append(len(set(top.tolist()) & set(mine.tolist())) / k)
    return {"n": n, "dim": dim, "queries": queries, "build_s": build_s, "numpy_build_s": numpy_build_s,
            "p50": percentile_ms(ours_t, 50), "p95": percentile_ms(ours_t, 95),
            "np_p50": percentile_ms(np_t, 50), "np_p95": percentile_ms(np_t, 95),
            "recall": float(np.mean(recalls)), "ours_mib": ours_mib, "numpy_mib": numpy_mib,
            "vectors_mib": n * dim * 4 / 2**20}


def pair_search_rows(dim: int) -> list[dict]:
    """What the near-duplicate step of training costs: a full pair search at 10k, an incremental one at 100k."""
    rows = []
    index = NeighborIndex.build([str(i) for i in range(10_000)], clustered(10_000, dim, seed=7))
    t0 = time.perf_counter()
    near_pairs(index, 0.97)
    rows.append({"what": "full pair search, 10k rows", "seconds": time.perf_counter() - t0})
    big = clustered(101_000, dim, seed=8)
    index = NeighborIndex.build([str(i) for i in range(100_000)], big[:100_000])
    index.add([str(i) for i in range(100_000, 101_000)], big[100_000:])
    t0 = time.perf_counter()
    near_pairs(index, 0.97, start=100_000)
    rows.append({"what": "incremental pair search, 1k new rows into 100k", "seconds": time.perf_counter() - t0})
    return rows


# ----- part 2: near-duplicates on animal-mnist ------------------------------------------------------------------


def augment(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a uint8 ``(28, 28)`` image: exact, 1 px crop of two sides resized back, horizontal flip, JPEG q75."""
    if kind == "exact":
        return image.copy()
    pil = Image.fromarray(image)
    if kind == "crop":  # 1 px off one horizontal and one vertical side (3.5 % of 28 px), resized back
        left, top = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        box = (left, top, 28 - (1 - left), 28 - (1 - top))
        return np.asarray(pil.crop(box).resize((28, 28), Image.BILINEAR))
    if kind == "flip":
        return np.ascontiguousarray(image[:, ::-1])
    if kind == "jpeg":
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    raise ValueError(kind)


def content_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def nearest_distinct(emb: np.ndarray, keys: list[str], members: np.ndarray) -> np.ndarray:
    """Each member's similarity to its most similar image of other content among ``emb`` (its hardest negative)."""
    index = NeighborIndex.build(keys, emb)  # one row per distinct content
    sims, rows = index.search(emb[members], 3)
    out = np.empty(len(members), dtype=np.float32)
    for j, m in enumerate(members):
        own = index.row(keys[m])
        out[j] = next(s for s, r in zip(sims[j], rows[j]) if r >= 0 and r != own)
    return out


def evaluate(emb: np.ndarray, keys: list[str], origin: np.ndarray, kind: list[str], calib: np.ndarray,
             held_out: np.ndarray, n_orig: int) -> dict:
    """Calibrate on ``calib`` originals, group everything, score pairs. ``origin[i]`` is the original of copy i
    (-1 for originals)."""
    copies = np.flatnonzero(origin >= 0)
    unit = normalise(emb)
    pos = np.array([unit[i] @ unit[origin[i]] for i in copies if np.isin(origin[i], calib) and kind[i] != "exact"])
    neg = nearest_distinct(emb[:n_orig], keys[:n_orig], calib)
    threshold = calibrate_threshold(pos, neg, MAX_FALSE_POSITIVE_RATE)
    medians = {"nearest distinct": float(np.median(neg))}
    for kd in KINDS[1:]:
        medians[kd] = float(np.median([unit[i] @ unit[origin[i]] for i in copies if kind[i] == kd]))
    index = NeighborIndex.build(keys, emb)
    t0 = time.perf_counter()
    groups = duplicate_groups(list(range(len(keys))), keys, near_pairs(index, threshold.value))
    group_s = time.perf_counter() - t0
    sweep = {}
    for value in SWEEP:
        swept = duplicate_groups(list(range(len(keys))), keys, near_pairs(index, value))
        sweep[value] = score(swept, keys, origin, kind, held_out)
    # the product's default: calibrated on the index of every image (copies included), knowing no copy
    auto = auto_threshold(index, MAX_FALSE_POSITIVE_RATE)
    auto_groups = duplicate_groups(list(range(len(keys))), keys, near_pairs(index, auto.value))
    return {"threshold": threshold, "group_s": group_s, "sweep": sweep, "medians": medians,
            "auto": {"threshold": auto, **score(auto_groups, keys, origin, kind, held_out)},
            **score(groups, keys, origin, kind, held_out)}


def score(groups: list, keys: list[str], origin: np.ndarray, kind: list[str], held_out: np.ndarray) -> dict:
    """Pair precision over everything grouped; recall per copy kind over the held-out originals' copies."""
    group_of = {}
    for g, group in enumerate(groups):
        for item in group.items:
            group_of[item] = g
    predicted = sum(len(g.items) * (len(g.items) - 1) // 2 for g in groups)
    # true pairs: copies of one original, and originals with the same content (animal-mnist repeats 284 images)
    root = np.where(origin >= 0, origin, np.arange(len(keys)))  # (M,) the original each image comes from
    first: dict[str, int] = {}
    for i in range(int((origin < 0).sum())):
        first.setdefault(keys[i], i)
    family = np.array([first[keys[int(r)]] for r in root])  # (M,) one id per original content
    correct = 0
    for group in groups:
        fam = family[list(group.items)]
        _, counts = np.unique(fam, return_counts=True)
        correct += int((counts * (counts - 1) // 2).sum())
    recall = {}
    held = set(held_out.tolist())
    for kd in KINDS:
        sel = [i for i in np.flatnonzero(origin >= 0) if kind[i] == kd and int(origin[i]) in held]
        found = [i for i in sel if i in group_of and group_of.get(int(origin[i])) == group_of[i]]
        recall[kd] = len(found) / max(1, len(sel))
    return {"precision": correct / max(1, predicted), "predicted_pairs": predicted, "recall": recall,
            "groups": len(groups), "largest": max((len(g.items) for g in groups), default=0)}


def duplicates_part(copies_per_kind: int, seed: int, encoder: Path, pretrain_minutes: float) -> dict:
    images, _ = load_animal_mnist()  # (10000, 28, 28) uint8
    n = len(images)
    rng = np.random.default_rng(seed)
    extra, origin, kind = [], [-1] * n, ["original"] * n
    for kd in KINDS:
        for src in rng.choice(n, copies_per_kind, replace=False):
            extra.append(augment(images[src], kd, rng))
            origin.append(int(src))
            kind.append(kd)
    everything = np.concatenate([images, np.stack(extra)])  # (N + 4C, 28, 28)
    keys = [content_key(im) for im in everything]
    if not (encoder / "encoder.safetensors").is_file():
        pretrain_encoder(encoder, images, pretrain_minutes)
    cfg, state, version = load_encoder(encoder)
    backbone = build_backbone(cfg)
    backbone.load_state_dict(state)
    backbone.eval()
    tag = hashlib.sha256(f"{version}-{copies_per_kind}-{seed}".encode()).hexdigest()[:10]
    cache = encoder / f"similarity-emb-{tag}.npy"
    if cache.is_file():
        emb = np.load(cache)
    else:
        emb = Embedder(backbone, cfg, device="cpu", batch_size=256).embed(list(everything))
        np.save(cache, emb)  # (M, D)
    info = {"version": version, "input_size": cfg.input_size, "encoder": str(encoder)}
    pixels = everything.reshape(len(everything), -1).astype(np.float32)  # (M, 784)
    pixels[np.linalg.norm(pixels, axis=1) == 0] += 1e-3  # an all-black image still has a direction
    order = rng.permutation(n)
    calib, held_out = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    origin_arr = np.array(origin)
    ours = evaluate(emb, keys, origin_arr, kind, calib, held_out, n)
    pix = evaluate(pixels, keys, origin_arr, kind, calib, held_out, n)
    exact = score(duplicate_groups(list(range(len(keys))), keys), keys, origin_arr, kind, held_out)
    return {"ours": ours, "pixels": pix, "exact": exact, "encoder": info, "dim": emb.shape[1], "n": len(keys)}


# ----- report ----------------------------------------------------------------------------------------------------


def report(speed: list[dict], pairs: list[dict], dup: dict | None, args: argparse.Namespace, wall_s: float) -> str:
    head = header("similarity: exact kNN index (faiss IndexFlatIP) vs brute-force numpy; near-duplicates on "
                  "animal-mnist")
    lines = [
        *head[:-2], load_line("at the end"),
        f"faiss {faiss.__version__}, numpy {np.__version__}, 1 thread (faiss and BLAS); total wall time {wall_s:.0f} s",
        "",
        f"## search, {args.dim}-d synthetic clustered vectors, k = 10, single queries",
        "",
        "| vectors | queries | ours build s | numpy build s | ours p50 ms | ours p95 ms | numpy p50 ms | numpy p95 ms "
        "| recall@10 (ours vs numpy) | ours RSS MiB | numpy RSS MiB | raw vectors MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in speed:
        lines.append(f"| {r['n']:,} | {r['queries']} | {r['build_s']:.2f} | {r['numpy_build_s']:.2f} | {r['p50']:.2f} "
                     f"| {r['p95']:.2f} | {r['np_p50']:.2f} | {r['np_p95']:.2f} | {r['recall']:.4f} | "
                     f"{r['ours_mib']:.0f} | {r['numpy_mib']:.0f} | {r['vectors_mib']:.0f} |")
    lines += ["", "Build: ours = normalise + faiss add + key map; numpy = normalise. RSS: resident memory the "
              "structure added.", "", "## near-duplicate pair search (what a training run adds)", "",
              "| what | seconds |", "|---|---:|"]
    lines += [f"| {p['what']} | {p['seconds']:.2f} |" for p in pairs]
    if dup is not None:
        enc = dup["encoder"]
        lines += ["", f"## near-duplicates: animal-mnist, {dup['n']:,} images (10,000 + {args.copies} copies of each "
                      f"kind), {dup['dim']}-d MoCo v2 embeddings",
                  "",
                  f"encoder: {enc['version']} in {enc['encoder']} (`taxomoco pretrain` on the 10,000 originals, the "
                  f"product's defaults, {enc['input_size']} px); threshold calibrated on half of the originals at <= "
                  f"{MAX_FALSE_POSITIVE_RATE:.1%} of nearest-distinct similarities, or (automatic, the product's "
                  f"default) at <= {MAX_FALSE_POSITIVE_RATE:.1%} of every image's most similar other image, copies "
                  "included and unknown; recall on the held-out half",
                  "",
                  "| method | threshold | calib. FP rate | pair precision | recall exact | recall crop | recall flip "
                  "| recall jpeg | groups | largest group |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, key in (("ours, the product's default (automatic threshold, no copy known)", "ours-auto"),
                          ("ours: MoCo embeddings + hash, calibrated with the known copies", "ours"),
                          ("baseline: raw-pixel cosine + hash, calibrated with the known copies", "pixels"),
                          ("baseline: raw-pixel cosine + hash, automatic threshold", "pixels-auto"),
                          ("baseline: content hash only", "exact")):
            r = dup[key.removesuffix("-auto")]["auto"] if key.endswith("-auto") else dup[key]
            t = r.get("threshold")
            thr = f"{t.value:.4f}" if t is not None else "-"
            fp = f"{t.false_positive_rate:.4f}" if t is not None else "-"
            rec = r["recall"]
            lines.append(f"| {name} | {thr} | {fp} | {r['precision']:.3f} | {rec['exact']:.3f} | {rec['crop']:.3f} | "
                         f"{rec['flip']:.3f} | {rec['jpeg']:.3f} | {r['groups']} | {r['largest']} |")
        lines += ["", "Pair precision counts every pair inside a predicted group; a pair is right when both images "
                      "are copies of one original (animal-mnist's own 284 repeated images included). Calib. FP rate of "
                      f"the automatic rows: the share of all images, copies included, whose most similar other image "
                      f"reaches the threshold (above {MAX_FALSE_POSITIVE_RATE:.1%} where the cap "
                      f"{AUTO_THRESHOLD_CAP} cut it).", "",
                  "Median cosine similarity of a copy to its original, and of an original to its most similar "
                  "image of other content:", "",
                  "| method | " + " | ".join(dup["ours"]["medians"]) + " |",
                  "|---|" + "---:|" * len(dup["ours"]["medians"])]
        for name, key in (("ours", "ours"), ("raw pixels", "pixels")):
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in dup[key]["medians"].values()) + " |")
        lines += ["", "Fixed thresholds (same data):", "",
                  "| method | threshold | pair precision | recall crop | recall flip | recall jpeg | groups | largest group |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, key in (("ours", "ours"), ("raw pixels", "pixels")):
            for value, r in dup[key]["sweep"].items():
                rec = r["recall"]
                lines.append(f"| {name} | {value} | {r['precision']:.3f} | {rec['crop']:.3f} | {rec['flip']:.3f} | "
                             f"{rec['jpeg']:.3f} | {r['groups']} | {r['largest']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (512: resnet18; 256: resnet18-half)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[200, 100, 20],
                        help="single queries timed per size (fewer at 1M: each scans 2 GB)")
    parser.add_argument("--copies", type=int, default=500, help="injected copies per kind (part 2)")
    parser.add_argument("--skip-duplicates", action="store_true", help="only part 1")
    parser.add_argument("--encoder", type=Path, default=ENCODER,
                        help="part 2's encoder directory (`taxomoco pretrain --out`); made there when absent")
    parser.add_argument("--pretrain-minutes", type=float, default=Settings().pretrain_max_minutes,
                        help="PRETRAIN_MAX_MINUTES of the pretraining that makes a missing --encoder (default: the "
                             "product's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    speed = []
    for n, q in zip(args.sizes, args.queries):
        row = speed_row(n, args.dim, q)
        print(row, flush=True)
        speed.append(row)
    pairs = pair_search_rows(args.dim)
    print(pairs, flush=True)
    dup = None if args.skip_duplicates else duplicates_part(args.copies, 0, args.encoder, args.pretrain_minutes)
    text = report(speed, pairs, dup, args, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
