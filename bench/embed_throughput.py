"""Embedding throughput: ``Embedder`` vs a bare ``torch.no_grad()`` forward; the embedding cache vs
recomputing; and RSS while streaming many embeddings into a memmap.

1. From encoded images, what a user waits for (the goal's comparison): the same N PNG files' bytes, decoded,
   resized and normalised by the same eval transform in a plain ``DataLoader`` (no worker processes, as the
   product's default), the same batch size, each batch to the device and its embeddings back to the CPU as
   float32: ``Embedder.embed`` (the product: header checks, EXIF orientation, RGB conversion, skipping unreadable
   images) vs the *tuned* bare loop (``torch.inference_mode()``, channels-last, bf16 autocast where the device has
   it, ``Image.open(...).convert("RGB")``).
2. Forward only, on the same preprocessed tensors ``(N, 3, S, S)``: the tuned bare loop and an untuned one
   (``torch.no_grad()``, fp32, contiguous) vs ``Embedder.embed_tensors``, each in its own process.
   Both comparisons are also made with ours and the tuned loop in one process on one module, in alternating passes
   (the ratio without the process-to-process spread of a shared machine).
3. Cache: ``EmbeddingCache.get`` of N known hashes (a fresh cache object, memory-mapped rows) vs
   recomputing the same N embeddings with ``Embedder.embed`` from the images.
4. Streaming: ``Embedder.embed_into`` a ``np.memmap`` of ``(N, D)`` from a dataset that renders its images
   on the fly, for a small and a large N; a sampling thread records the peak anonymous RSS (heap; the
   memmap's file pages are page cache and are listed apart). Bounded means: peak heap does not grow with N.

Every variant runs in its own child process (peak RSS is its own), makes one untimed pass first (the first call
builds the convolution kernels) and keeps the best of ``--repeat`` timed passes. Images are synthetic (rendered
shapes).

Usage: ``.venv/bin/python bench/embed_throughput.py [--device cpu|cuda] [--arch resnet18-half] [--size 64] [--batch 256]
[--n 1024] [--stream-n 10000] [--threads 2] [--out bench/results/embed_throughput.txt]``
(``--stream-n 100000`` for the 100k case).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pretrain_throughput import _cpu_s, _sync, synthetic_images  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from bench.provenance import header, load_line, write_result  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _setup(args: argparse.Namespace):
    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig

    torch.manual_seed(0)
    cfg = EncoderConfig(arch=args.arch, input_size=args.size)
    return cfg, build_backbone(cfg).eval()


def _tensors(cfg, images: list[np.ndarray]) -> torch.Tensor:
    from model.encoder.config import eval_transform

    t = eval_transform(cfg)
    return torch.stack([t(Image.fromarray(a)) for a in images])  # (N, 3, S, S)


def _bare(net: torch.nn.Module, x: torch.Tensor, batch: int, device: torch.device, tuned: bool) -> np.ndarray:
    """The bare loop: batches to ``device``, forward, embeddings ``(N, D)`` float32 back on the CPU."""
    from model.encoder.device import bf16_supported

    fmt = torch.channels_last if tuned else torch.contiguous_format
    bf16 = tuned and bf16_supported(device)
    outs = []
    with torch.inference_mode() if tuned else torch.no_grad():
        for i in range(0, len(x), batch):
            part = x[i:i + batch].to(device, non_blocking=True).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outs.append(net(part).float().cpu())  # (b, D)
    return torch.cat(outs).numpy()


def _png(images: list[np.ndarray]) -> list[bytes]:
    """The images as PNG files' bytes, what a project's images are before they are decoded."""
    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _bare_images(net: torch.nn.Module, cfg, files: list[bytes], batch: int, device: torch.device) -> np.ndarray:
    """The tuned bare loop from encoded images: decode + the eval transform in a plain DataLoader (no workers),
    then :func:`_bare` per batch; embeddings ``(N, D)`` float32 on the CPU."""
    from torch.utils.data import DataLoader

    from model.encoder.config import eval_transform

    transform = eval_transform(cfg)

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> torch.Tensor:
            return transform(Image.open(io.BytesIO(files[i])).convert("RGB"))  # (3, S, S)

    loader = DataLoader(Files(), batch_size=batch, shuffle=False, num_workers=0, pin_memory=device.type == "cuda")
    return np.concatenate([_bare(net, x, batch, device, tuned=True) for x in loader])


def run_forward(args: argparse.Namespace, which: str) -> dict:
    """A bare loop or the Embedder, on tensors or from encoded images: one untimed pass, then ``--repeat`` timed
    passes, the best kept."""
    from model.encoder.device import bf16_supported
    from model.encoder.embedder import Embedder

    cfg, net = _setup(args)
    device = torch.device(args.device)
    images = synthetic_images(args.n, args.image_px)
    from_files = which.endswith("-images")
    files = _png(images) if from_files else []
    x = None if from_files else _tensors(cfg, images)
    best, best_cpu = 0.0, 0.0
    emb = None
    if which.startswith("bare"):
        net = net.to(device)
        if which.startswith("bare-tuned"):
            net = net.to(memory_format=torch.channels_last)
    else:
        emb = Embedder(net, cfg, device=args.device, batch_size=args.batch)

    def one_pass() -> np.ndarray:
        if which == "bare-tuned-images":
            return _bare_images(net, cfg, files, args.batch, device)
        if which.startswith("bare"):
            return _bare(net, x, args.batch, device, tuned=which == "bare-tuned")
        if which == "embedder":
            return emb.embed_tensors(x)
        return emb.embed(files)

    one_pass()  # untimed: the first call builds the kernels
    for _ in range(args.repeat):
        _sync(args.device)
        t0, c0 = time.perf_counter(), _cpu_s()
        out = one_pass()
        _sync(args.device)
        best = max(best, args.n / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, args.n / (_cpu_s() - c0))
    assert out.shape == (args.n, net.out_dim) and np.isfinite(out).all()
    bf16 = bool(emb.bf16) if emb else which.startswith("bare-tuned") and bf16_supported(device)
    return {"images_per_s": best, "images_per_cpu_s": best_cpu, "peak_rss_mib": _peak_rss_mib(),
            "bf16": bf16, "checksum": float(np.abs(out).mean())}


def run_pair(args: argparse.Namespace) -> dict:
    """Both in one process on one module: ours and the tuned bare loop in alternating passes (``2 * --repeat + 4``
    pairs), from PNG files and on tensors, so the process's placement and neighbours are the same for both; ours /
    bare per pair, by wall and by CPU time."""
    from model.encoder.embedder import Embedder

    cfg, net = _setup(args)
    device = torch.device(args.device)
    images = synthetic_images(args.n, args.image_px)
    files, x = _png(images), _tensors(cfg, images)
    emb = Embedder(net, cfg, device=args.device, batch_size=args.batch)  # channels-last, on device: the same module
    passes = {("files", "ours"): lambda: emb.embed(files),
              ("files", "bare"): lambda: _bare_images(emb.backbone, cfg, files, args.batch, device),
              ("tensors", "ours"): lambda: emb.embed_tensors(x),
              ("tensors", "bare"): lambda: _bare(emb.backbone, x, args.batch, device, True)}
    for run in passes.values():
        run()  # untimed first passes
    wall: dict[tuple[str, str], list[float]] = {k: [] for k in passes}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in passes}
    for k in range(2 * args.repeat + 4):
        for data in ("files", "tensors"):
            for name in ("bare", "ours") if k % 2 == 0 else ("ours", "bare"):
                _sync(args.device)
                t0, c0 = time.perf_counter(), _cpu_s()
                passes[(data, name)]()
                _sync(args.device)
                wall[(data, name)].append(time.perf_counter() - t0)
                cpu[(data, name)].append(_cpu_s() - c0)
    # ours / bare in images per second = bare seconds / ours seconds
    return {f"{data}_{kind}": [b / o for o, b in zip(t[(data, "ours")], t[(data, "bare")])]
            for data in ("files", "tensors") for kind, t in (("wall", wall), ("cpu", cpu))}


def run_cache(args: argparse.Namespace) -> dict:
    """Fill a cache, then time ``get`` from a fresh cache object against recomputing from images."""
    from model.encoder.backbone import encoder_version
    from model.encoder.cache import EmbeddingCache
    from model.encoder.embedder import Embedder
    from model.images import content_hash

    cfg, net = _setup(args)
    images = synthetic_images(args.n, args.image_px)
    hashes = [content_hash(a.tobytes()) for a in images]
    emb = Embedder(net, cfg, device=args.device, batch_size=args.batch)
    t0 = time.perf_counter()
    fresh = emb.embed(images)  # (N, D)
    recompute_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as root:
        version = encoder_version(net.state_dict())
        EmbeddingCache(Path(root), version, net.out_dim).put(hashes, fresh)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            cached, found = EmbeddingCache(Path(root), version, net.out_dim).get(hashes)
            best = min(best, time.perf_counter() - t0)
        assert found.all() and np.array_equal(cached, fresh)
    return {"recompute_s": recompute_s, "get_s": best, "recompute_per_s": args.n / recompute_s,
            "get_per_s": args.n / best, "peak_rss_mib": _peak_rss_mib()}


class RenderedImages(Dataset):
    """Image i rendered on demand (a seeded rectangle on a noisy background), so inputs never pile up."""

    def __init__(self, n: int, px: int, transform) -> None:
        self.n, self.px, self.transform = n, px, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (self.px, self.px, 3), dtype=np.uint8)
        y, x = rng.integers(0, self.px // 2, 2)
        arr[y:y + self.px // 3, x:x + self.px // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        return self.transform(Image.fromarray(arr)), i


def run_stream(args: argparse.Namespace, n: int) -> dict:
    """``embed_into`` a memmap of (n, D) while a thread samples RSS every 20 ms."""
    from model.encoder.config import eval_transform
    from model.encoder.embedder import Embedder

    cfg, net = _setup(args)
    emb = Embedder(net, cfg, device=args.device, batch_size=args.batch)
    peak = {"anon": 0.0, "file": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_mib("RssAnon"))
            peak["file"] = max(peak["file"], _status_mib("RssFile"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory() as d:
        out = np.lib.format.open_memmap(Path(d) / "emb.npy", mode="w+", dtype=np.float32, shape=(n, net.out_dim))
        anon_before = _status_mib("RssAnon")
        sampler.start()
        t0 = time.perf_counter()
        ok = emb.embed_into(RenderedImages(n, args.image_px, eval_transform(cfg)), out)
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        out.flush()
        assert ok.all() and np.isfinite(out[-1]).all()
    return {"n": n, "images_per_s": n / seconds, "anon_before_mib": anon_before, "peak_anon_mib": peak["anon"],
            "peak_file_mib": peak["file"], "output_mib": n * net.out_dim * 4 / 2**20, "peak_rss_mib": _peak_rss_mib()}


def _child(args_list: list[str], only: str) -> dict:
    cmd = [sys.executable, __file__, *args_list, "--only", only]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{only} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[0][7:])
    print(f"{only}: {result}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18-half", choices=["resnet18", "resnet18-half"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--image-px", type=int, default=80)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n", type=int, default=1024, help="images for the forward and cache comparisons")
    p.add_argument("--repeat", type=int, default=2, help="passes per child; the best is kept")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the forward variants")
    p.add_argument("--stream-n", type=int, default=10000, help="images streamed to the memmap (try 100000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed_throughput.txt")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every variant on that device)")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.only:
        if args.only.startswith("stream"):
            result = run_stream(args, int(args.only.split(":")[1]))
        elif args.only == "cache":
            result = run_cache(args)
        elif args.only == "pair":
            result = run_pair(args)
        else:
            result = run_forward(args, args.only)
        print("RESULT " + json.dumps(result))
        return

    argv = sys.argv[1:]
    head = header("Embedding throughput: Embedder vs the tuned bare forward; cache; streaming")
    fwd: dict[str, list[dict]] = {"bare-tuned-images": [], "embedder-images": [], "bare-tuned": [], "embedder": [],
                                  "bare": []}
    names = list(fwd)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: load drifts
            fwd[name].append(_child(argv, name))
    pairs = [_child(argv, "pair") for _ in range(args.rounds)]
    cache = _child(argv, "cache")
    small_n = max(args.batch, args.stream_n // 10)
    streams = [_child(argv, f"stream:{small_n}"), _child(argv, f"stream:{args.stream_n}")]

    bf16 = fwd["embedder"][0]["bf16"]
    tuned = "`torch.inference_mode()`, channels-last" + (", bf16" if bf16 else "")
    desc = {"bare-tuned-images": f"PNG files: bare loop, tuned ({tuned}), decode + transform in a DataLoader",
            "embedder-images": "PNG files: ours, `Embedder.embed` (decode + checks + transform + forward)",
            "bare-tuned": f"tensors: bare loop, tuned ({tuned})",
            "embedder": "tensors: ours, `Embedder.embed_tensors`",
            "bare": "tensors: bare loop, untuned (`torch.no_grad()`, fp32, contiguous)"}
    lines = head + [
        f"Setting: device {args.device}, {args.threads} torch threads, {args.arch} at {args.size} px, batch "
        f"{args.batch}, N = {args.n} synthetic {args.image_px}px colour images (rendered shapes), bf16: {bf16}; "
        f"{args.rounds} rounds in rotating order, each variant in its own process, one untimed pass then the best of "
        f"{args.repeat} timed passes per process.",
        "",
        "## Embedding throughput: from PNG files (what a user waits for) and on preprocessed tensors (forward only)",
        "",
        "| variant | images/s median (min-max) | images per CPU-s median | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for name in fwd:
        ips = [r["images_per_s"] for r in fwd[name]]
        lines.append(f"| {desc[name]} | {statistics.median(ips):.0f} ({min(ips):.0f}-{max(ips):.0f}) | "
                     f"{statistics.median(r['images_per_cpu_s'] for r in fwd[name]):.0f} | "
                     f"{max(r['peak_rss_mib'] for r in fwd[name]):.0f} |")
    verdicts = []
    for ours, bare, what in (("embedder-images", "bare-tuned-images", "from PNG files, the goal"),
                             ("embedder", "bare-tuned", "forward only, on tensors")):
        rt = [o["images_per_s"] / t["images_per_s"] for o, t in zip(fwd[ours], fwd[bare])]
        spread = statistics.stdev(rt) if len(rt) > 1 else 0.0
        mean = statistics.mean(rt)
        verdict = ("met" if mean - spread >= 0.9 else "missed" if mean + spread < 0.9 else
                   "not decided (0.9 within one std)")
        cpu_rt = [o["images_per_cpu_s"] / t["images_per_cpu_s"] for o, t in zip(fwd[ours], fwd[bare])]
        verdicts.append(f"Embedder / tuned bare loop, per round ({what}): " + ", ".join(f"{r:.2f}" for r in rt)
                        + f"; mean {mean:.2f} ± {spread:.2f} (std); by CPU time mean {statistics.mean(cpu_rt):.2f}. "
                        f"Goal >= 0.9: {verdict}.")
    for data, what in (("files", "from PNG files"), ("tensors", "forward only")):
        per_wall = [statistics.median(p[f"{data}_wall"]) for p in pairs]
        per_cpu = [statistics.median(p[f"{data}_cpu"]) for p in pairs]
        verdicts.append(
            f"Both in one process on one module, alternating passes ({len(pairs[0]['files_wall'])} pairs per process, "
            f"{len(pairs)} processes), {what}: Embedder / tuned bare loop, median per process "
            + ", ".join(f"{r:.2f}" for r in per_wall) + f" by wall ({', '.join(f'{r:.2f}' for r in per_cpu)} by "
            f"CPU time); median of all pairs {statistics.median(r for p in pairs for r in p[f'{data}_wall']):.2f}.")
    verdicts.append("The per-process ratios above also carry where each process ran on this shared machine; the "
                    "one-process pairs do not.")
    lines += [""] + verdicts + [
        "",
        f"## Cached re-embed vs recomputing (N = {args.n})",
        "",
        "| path | seconds | images/s | speed-up |",
        "|---|---|---|---|",
        f"| recompute: `Embedder.embed` from images | {cache['recompute_s']:.3f} | {cache['recompute_per_s']:.0f} | 1 |",
        f"| cache: fresh `EmbeddingCache(...).get(hashes)` (memmap) | {cache['get_s']:.4f} | "
        f"{cache['get_per_s']:.0f} | {cache['recompute_s'] / cache['get_s']:.0f}x |",
        "",
        f"Cache / recompute speed-up = {cache['recompute_s'] / cache['get_s']:.0f}x (target >= 20x); "
        f"peak RSS of that process {cache['peak_rss_mib']:.0f} MiB.",
        "",
        "## Streaming into a memmap (`Embedder.embed_into`, images rendered on the fly)",
        "",
        "| N | images/s | output (memmap) MiB | heap before MiB | peak heap (RssAnon) MiB "
        "| peak file pages (RssFile) MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in streams:
        lines.append(f"| {s['n']} | {s['images_per_s']:.0f} | {s['output_mib']:.1f} | {s['anon_before_mib']:.0f} | "
                     f"{s['peak_anon_mib']:.0f} | {s['peak_file_mib']:.0f} | {s['peak_rss_mib']:.0f} |")
    growth = streams[1]["peak_anon_mib"] - streams[0]["peak_anon_mib"]
    lines += ["", f"Heap growth from N = {streams[0]['n']} to N = {streams[1]['n']}: {growth:+.0f} MiB while the "
                  f"output grew by {streams[1]['output_mib'] - streams[0]['output_mib']:.0f} MiB "
                  "(file-backed memmap pages are page cache the kernel can write back and drop).",
              "",
              load_line("at the end")]
    write_result(args.out, "\n".join(lines) + "\n", append=args.append)


if __name__ == "__main__":
    main()
