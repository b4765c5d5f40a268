"""Larger than memory: decode and train on a synthetic dataset of --n X-rays (default 100,000) without holding
it in memory, beside the in-memory path on Kermany.

1. Makes the dataset in --workdir (outside the repo; default /tmp/cxr-large): each image is one of the shared
   Kermany 224 px training X-rays with a small random shift, brightness change and noise, half written as PNG
   and half as DICOM (8-bit MONOCHROME2, explicit VR little endian), in class folders. Files are written
   atomically in parallel, so an interrupted run resumes where it stopped.
2. Decodes them once through core.cache.decode_images (the chunked, memory-mapped cache), printing images/s.
3. Trains --steps steps of the preset (default `cpu`) streaming batches from MappedImages with BatchPrefetcher,
   then the same steps on Kermany 224 held in memory, printing train images/s.
Peak RSS of the process tree (this process plus its decode workers, sampled from /proc) is printed per phase:
total and anonymous (RssAnon; the rest are file pages of the memory-mapped cache, which the kernel can drop).

    nice -n 10 .venv/bin/python bench/benchmark_large_dataset.py --n 5000 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "kermany_224" / "train"
CLASSES = ("NORMAL", "PNEUMONIA")


# ---------------------------------------------------------------- memory

def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes."""
    total = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total, anon


class TreeMemory:
    """Peak RSS of this process and all its descendants together, sampled every `every` seconds."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.peak_total = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = [_rss(p) for p in _tree_pids(os.getpid())]
            self.peak_total = max(self.peak_total, sum(r[0] for r in rss))
            self.peak_anon = max(self.peak_anon, sum(r[1] for r in rss))
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        return f"peak RSS {self.peak_total / 2**30:.2f} GiB (anonymous {self.peak_anon / 2**30:.2f} GiB)"


# ---------------------------------------------------------------- the dataset

def _target(workdir: Path, i: int, label: int) -> Path:
    ext = ".png" if i % 2 == 0 else ".dcm"
    return workdir / "data" / CLASSES[label] / f"synth-{i:06d}{ext}"


def _vary(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small shift (up to 8 px, edges repeated), brightness (x0.85-1.15, +-12) and noise (sigma up to 6)."""
    dy, dx = rng.integers(-8, 9, 2)
    shifted = np.pad(pixels, 8, mode="edge")[8 + dy:8 + dy + pixels.shape[0], 8 + dx:8 + dx + pixels.shape[1]]
    out = shifted * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12) + rng.normal(0, rng.uniform(0, 6), pixels.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _write_dicom(path: Path, pixels: np.ndarray, i: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID, ds.PatientAge, ds.PatientSex, ds.ViewPosition = f"SYN{i // 4:06d}", "045Y", "F", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _make_range(args: tuple[str, list[str], list[int], int, int, int]) -> int:
    """Write images start..stop-1 that are not there yet; returns how many were written."""
    from PIL import Image

    workdir, sources, labels, start, stop, seed = args
    written = 0
    for i in range(start, stop):
        src = i % len(sources)
        target = _target(Path(workdir), i, labels[src])
        if target.exists():
            continue
        rng = np.random.default_rng([seed, i])
        with Image.open(sources[src]) as img:
            pixels = _vary(np.asarray(img.convert("L").resize((224, 224))), rng)
        tmp = target.with_name(f".{target.name}.tmp")
        if target.suffix == ".png":
            Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
        else:
            _write_dicom(tmp, pixels, i)
        os.replace(tmp, target)  # a killed run leaves no half-written image under the real name
        written += 1
    return written


def make_dataset(workdir: Path, n: int, workers: int, seed: int) -> list[tuple[str, int]]:
    sources = [p for c in CLASSES for p in sorted((SOURCE / c).glob("*.jpeg"))]
    labels = [CLASSES.index(p.parent.name) for p in sources]
    if not sources:
        raise SystemExit(f"error: no X-rays found in {SOURCE}")
    for c in CLASSES:
        (workdir / "data" / c).mkdir(parents=True, exist_ok=True)
    for c in CLASSES:  # temporaries of a killed run
        for tmp in (workdir / "data" / c).glob(".*.tmp"):
            tmp.unlink()
    step = 500
    jobs = [(str(workdir), [str(s) for s in sources], labels, a, min(a + step, n), seed) for a in range(0, n, step)]
    t0, written = time.time(), 0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, w in enumerate(pool.map(_make_range, jobs)):
            written += w
            print(f"\rgenerating {min((k + 1) * step, n):,}/{n:,} images ({written:,} written now)",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    seconds = time.time() - t0
    if written:
        print(f"generated {written:,} images in {seconds:.0f}s ({written / seconds:.0f} images/s)")
    return [(str(_target(workdir, i, labels[i % len(sources)])), labels[i % len(sources)]) for i in range(n)]


# ---------------------------------------------------------------- training

def train_steps(images, labels: np.ndarray, preset: str, steps: int, seed: int) -> dict:
    """`steps` training steps of the preset's model, batches read ahead by BatchPrefetcher, as the trainer does."""
    import torch

    from core.augment import AugmentParams
    from core.config import config_from_preset
    from core.device import autocast, select_device, uses_bf16
    from core.model import apply_strategy, build_model, normalization, set_train_mode
    from core.pipeline import to_model_input
    from core.streaming import BatchPrefetcher

    config = config_from_preset(preset, device="cpu")
    device = select_device("cpu")
    bf16 = uses_bf16(device, config.precision)
    torch.manual_seed(seed)
    model = build_model(config.arch, config.pretrained, config.weights_file, config.dropout)
    params = apply_strategy(model, config.strategy)
    model.to(device).to(memory_format=torch.channels_last)
    set_train_mode(model, config.strategy)
    mean, std = normalization(config.arch)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    aug = AugmentParams(config.aug_flip, config.aug_rotation, config.aug_scale, config.aug_shift,
                        config.aug_brightness, config.aug_contrast) if config.augment else None
    aug_gen = torch.Generator().manual_seed(seed + 1)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    bs = config.batch_size
    per_epoch = -(-len(labels) // bs)
    done = waited = 0.0
    seen = 0
    t0 = time.time()
    epoch = 0
    while done < steps:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        with BatchPrefetcher(images, perm, bs, 0, min(per_epoch, steps - int(done))) as batches:
            t_wait = time.time()
            for _, idx, batch in batches:
                waited += time.time() - t_wait
                x = to_model_input(batch, device, mean, std, aug, aug_gen)
                with autocast(device, bf16):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(idx)
                done += 1
                t_wait = time.time()
        epoch += 1
    seconds = time.time() - t0
    return {"steps": int(done), "images": seen, "seconds": seconds, "images_per_s": seen / seconds,
            "waiting_for_data_s": waited, "final_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-large"))
    ap.add_argument("--n", type=int, default=100_000, help="synthetic images to make (at least 1,000)")
    ap.add_argument("--steps", type=int, default=300, help="training steps on each dataset")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.n < 1000 or args.steps < 1 or args.workers < 1:
        raise SystemExit("error: --n must be at least 1000, --steps and --workers at least 1")
    workdir = args.workdir.resolve()
    if workdir == REPO or REPO in workdir.parents:
        raise SystemExit(f"error: --workdir {workdir} is inside the repository; choose a folder outside it")

    import torch

    from core.cache import DecodeProgress, decode_images
    from core.config import config_from_preset

    size = config_from_preset(args.preset).image_size
    results: dict = {"n": args.n, "preset": args.preset, "image_size": size, "steps": args.steps,
                     "workers": args.workers, "torch_threads": torch.get_num_threads()}
    with TreeMemory() as mem:
        files = make_dataset(workdir, args.n, args.workers, args.seed)
    results["generate_peak_rss_gib"] = mem.peak_total / 2**30

    paths = [p for p, _ in files]
    labels = np.array([lab for _, lab in files])
    cache_dir = workdir / "cache"
    with TreeMemory() as mem:
        t0 = time.time()
        decoded = decode_images(paths, size, cache_dir, args.workers, progress=DecodeProgress(), root=str(workdir))
        seconds = time.time() - t0
    results["decode"] = {"decoded_now": decoded.decoded_now, "seconds": seconds,
                         "images_per_s": decoded.decoded_now / seconds if decoded.decoded_now else None,
                         "failed": len(decoded.failed), "chunks": len(decoded.chunks),
                         "peak_rss_gib": mem.peak_total / 2**30, "peak_anon_gib": mem.peak_anon / 2**30}
    print(f"decode: {decoded.decoded_now:,} images decoded in {seconds:.0f}s"
          + (f" ({decoded.decoded_now / seconds:.0f} images/s)" if decoded.decoded_now else " (all from the cache)")
          + f", {len(decoded.failed)} failed, {len(decoded.chunks)} chunks; {mem.text()}")
    if decoded.failed:
        print("first failure:", next(iter(decoded.failed.items())))

    with TreeMemory() as mem:
        streamed = train_steps(decoded.mapped(), labels[decoded.ok_indices], args.preset, args.steps, args.seed)
    results["train_streaming"] = {**streamed, "peak_rss_gib": mem.peak_total / 2**30,
                                  "peak_anon_gib": mem.peak_anon / 2**30}
    print(f"train, streaming {len(decoded.ok_indices):,} images from the memory-mapped cache: "
          f"{streamed['steps']} steps, {streamed['images_per_s']:.0f} images/s "
          f"({streamed['waiting_for_data_s']:.1f}s waiting for batches); {mem.text()}")
    del decoded, streamed

    kermany = [(str(p), i) for i, c in enumerate(CLASSES) for p in sorted((SOURCE / c).glob("*.jpeg"))]
    with TreeMemory() as mem:
        small = decode_images([p for p, _ in kermany], size, cache_dir, args.workers, progress=DecodeProgress())
        tensor = torch.from_numpy(small.images).unsqueeze(1)  # the in-memory path: the whole split as one tensor
        in_memory = train_steps(tensor, np.array([lab for _, lab in kermany])[small.ok_indices], args.preset,
                                args.steps, args.seed)
    results["train_in_memory_kermany"] = {**in_memory, "n": len(small.ok_indices),
                                          "peak_rss_gib": mem.peak_total / 2**30,
                                          "peak_anon_gib": mem.peak_anon / 2**30}
    print(f"train, in memory, Kermany 224 ({len(small.ok_indices):,} images): {in_memory['steps']} steps, "
          f"{in_memory['images_per_s']:.0f} images/s; {mem.text()}")
    self_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    results["ru_maxrss_gib"] = {"self": self_max, "largest_child": children_max}
    print(f"ru_maxrss: this process {self_max:.2f} GiB, largest child {children_max:.2f} GiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
