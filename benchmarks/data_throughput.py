"""Per-process image decode throughput of the input pipeline, and how many workers feed one H100.

    nice -n 5 python -m benchmarks.data_throughput [--data_dir=DIR] [--num=10] [--batch=256] \
        [--grain_workers=0,1,2] [--grain_batches=20]

Times ``ImageDataset(..., cache_in_memory=False).batch(step)`` -- the trainer's code path: array_record
read, PNG/JPEG decode (TFDS, PIL), resize, float conversion -- on one thread: one warm-up batch, then
``--num`` (>= 5) batches; images/s is the median over them. Datasets: ``digits`` (8x8 grey PNG),
``shapes`` (32x32 RGB PNG), ``cifar-like`` (2,000 generated 32x32 RGB PNGs, ~2.5 KB each like
CIFAR-10's) and ``jpeg256`` (1,000 generated 256x256 RGB JPEGs, quality 90, ~15 KB), the last read at
256 (no resize) and at 64 (decode + downsample). Generated images are smooth multi-scale noise (bicubic
upsampled from 4x4 up, 1/f-like amplitudes, plus pixel noise), so compressed sizes are realistic. They
are built once into the data dir (default: a temporary dir) as TFDS array_record datasets, without
TensorFlow, like ``jaxdiff.data.digits``.

"Workers for 9,300 img/s" = ceil(9300 / rate): decode workers (processes) of this speed needed to feed
one H100 training the DDPM CIFAR-10 model, ASSUMING LINEAR SCALING (one free core per worker, no
contention, no IPC cost).

``--grain_workers=K,...`` (needs ``pip install grain``) also reads cifar-like and jpeg256@64 through
grain's ``DataLoader`` (random access over the same ``tfds.data_source``; same decode, resize and
float conversion) with ``worker_count=K`` processes (0 = in the main process), one read thread each;
images/s = images / wall time over ``--grain_batches`` batches after two warm-up batches per worker
(workers are spawned processes that import jaxdiff and tfds: seconds to start).
"""
import datetime
import io
import math
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from PIL import Image

from benchmarks.harness import cpu_info, load_average, timed

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data dir (default: a temporary dir, removed at the end).")
_NUM = flags.DEFINE_integer("num", 10, "Timed batches per dataset (>= 5; median).")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_GRAIN = flags.DEFINE_list("grain_workers", [], "Also time grain's DataLoader with these worker counts.")
_GRAIN_BATCHES = flags.DEFINE_integer("grain_batches", 20, "Timed batches per grain run.")

TARGET_IMG_S = 9300  # DDPM CIFAR-10 training on one H100


# -------------------------------------------------------------------------- generated datasets
def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: sums of bicubic-upsampled Gaussian noise at 4, 8, ... size px
    (amplitude x0.55 per octave), plus pixel noise (std 3) and a random mean colour."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        acc = rng.normal(0.0, 3.0, (size, size, 3)).astype(np.float32) + rng.uniform(60, 190, 3)
        s, amp = 4, 60.0
        while s <= size:
            low = rng.normal(0.0, amp, (s, s, 3)).astype(np.float32)
            acc += np.stack([np.asarray(Image.fromarray(low[..., c], mode="F").resize(
                (size, size), Image.BICUBIC)) for c in range(3)], axis=-1)
            s, amp = 2 * s, 0.55 * amp
        out[i] = np.clip(np.round(acc), 0, 255)
    return out


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


class _Generated(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """``NUM`` smooth SIZE x SIZE RGB images in FORMAT, random labels; one split, ``train``."""

    VERSION = tfds.core.Version("1.0.0")
    SIZE, NUM, FORMAT = 32, 2000, "png"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # see jaxdiff.data.digits.Digits.code_path

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self.SIZE, self.SIZE, 3), encoding_format=self.FORMAT),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        labels = np.random.default_rng(1).integers(0, 10, self.NUM)
        for a in range(0, self.NUM, 250):  # bounded memory
            for j, image in enumerate(smooth_images(min(250, self.NUM - a), self.SIZE, seed=a)):
                # encoded bytes, not arrays: encoding an array would need TensorFlow
                yield a + j, {"image": encode(image, self.FORMAT), "label": int(labels[a + j])}


class BenchCifarLike(_Generated, skip_registration=True):
    """2,000 smooth 32x32 RGB PNGs (CIFAR-10's format and ~size)."""
    SIZE, NUM, FORMAT = 32, 2000, "png"


class BenchJpeg256(_Generated, skip_registration=True):
    """1,000 smooth 256x256 RGB JPEGs, quality 90."""
    SIZE, NUM, FORMAT = 256, 1000, "jpeg"


def prepare(cls, data_dir: str) -> str:
    """Builds ``cls`` into ``data_dir`` if it is not there yet; returns its TFDS name."""
    from jaxdiff.data.builders import prepare_local_builder

    return prepare_local_builder(cls, data_dir, cls.name, str(cls.VERSION)).name


# ------------------------------------------------------------------------------------- timing
def time_pipeline(name: str, image_size, data_dir: str, batch: int, num: int) -> tuple[float, float]:
    """(median images/s, stored KB per example) of ``ImageDataset(...).batch(step)``, one thread."""
    from jaxdiff.data.pipeline import ImageDataset, load_source

    ds = ImageDataset(name, "train", batch_size=batch, image_size=image_size, data_dir=data_dir,
                      cache_in_memory=False)
    steps = iter(range(num + 1))  # batch 0 warms up, batches 1..num are timed
    rates = [batch / t for t in timed(lambda: ds.batch(next(steps)), num, warmup=1)]
    # stored size: the split's array_record files / examples (encoded image + label + record overhead)
    info = load_source(name, "train", data_dir).dataset_info
    nbytes = sum(os.path.getsize(p) for p in epath.Path(info.data_dir).glob("*train.array_record*"))
    return float(np.median(rates)), nbytes / info.splits["train"].num_examples / 1024


class _Prep:  # a grain MapTransform (built lazily: grain is optional)
    def __init__(self, size):
        self.size = size

    def map(self, ex):
        from jaxdiff.data.builders import resize_image
        return {"image": resize_image(np.asarray(ex["image"]), self.size), "label": np.int32(ex["label"])}


class _ToFloat:
    def map(self, b):
        return {"image": b["image"].astype(np.float32) / 127.5 - 1.0, "label": b["label"]}


def time_grain(name: str, image_size, data_dir: str, batch: int, num: int, workers: int) -> float:
    """images/s of grain's DataLoader with ``workers`` processes over the same tfds data source."""
    import grain.python as gp
    from jaxdiff.data.pipeline import load_source

    src = load_source(name, "train", data_dir)
    prep = type("Prep", (_Prep, gp.MapTransform), {})(image_size)
    to_float = type("ToFloat", (_ToFloat, gp.MapTransform), {})()
    loader = gp.DataLoader(
        data_source=src, operations=[prep, gp.Batch(batch, drop_remainder=True), to_float],
        sampler=gp.IndexSampler(len(src), shard_options=gp.NoSharding(), shuffle=True, seed=0),
        worker_count=workers, read_options=gp.ReadOptions(num_threads=1, prefetch_buffer_size=batch))
    it = iter(loader)
    for _ in range(2 * max(1, workers)):
        next(it)  # warm-up: worker start-up and first batches of each
    t0 = time.perf_counter()
    for _ in range(num):
        next(it)
    rate = num * batch / (time.perf_counter() - t0)
    getattr(getattr(it, "_iterator", None), "close", lambda: None)()  # stop workers, free shared memory
    return rate


def machine() -> str:
    cpu, la = cpu_info(), load_average()
    load = f", load avg {la[0]:.2f}" if la else ""
    return (f"{cpu['cpu']}, {cpu['cpu_cores']} cores ({len(os.sched_getaffinity(0))} usable), "
            f"nice {os.nice(0)}{load}; {datetime.date.today().isoformat()}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _NUM.value < 5:
        raise app.UsageError("--num must be >= 5.")
    data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="jaxdiff_data_throughput_")
    t_start = time.perf_counter()
    cifar, jpeg = prepare(BenchCifarLike, data_dir), prepare(BenchJpeg256, data_dir)
    print(f"machine: {machine()}\ndata dir {data_dir} (built/checked in {time.perf_counter() - t_start:.1f} s); "
          f"batch {_BATCH.value}, median of {_NUM.value} batches after 1 warm-up, one thread\n")
    rows = [("digits", "digits", "8x8x1 PNG", None), ("shapes", "shapes", "32x32x3 PNG", None),
            ("cifar-like", cifar, "32x32x3 PNG", None), ("jpeg256", jpeg, "256x256x3 JPEG q90", 256),
            ("jpeg256@64", jpeg, "256x256x3 JPEG q90 -> 64x64", 64)]
    print(f"| dataset | image format/size | KB/image | images/s per process | workers for {TARGET_IMG_S:,} img/s |")
    print("| --- | --- | --- | --- | --- |")
    for label, name, fmt, size in rows:
        rate, kb = time_pipeline(name, size, data_dir, _BATCH.value, _NUM.value)
        print(f"| {label} | {fmt} | {kb:.1f} | {rate:,.0f} | {math.ceil(TARGET_IMG_S / rate)} |", flush=True)
    print(f"\nworkers = ceil({TARGET_IMG_S} / images/s), assuming linear scaling over workers "
          "(a free core each, no contention or IPC cost).")
    if _GRAIN.value:
        import grain
        ks = [int(k) for k in _GRAIN.value]
        print(f"\ngrain {getattr(grain, '__version__', '?')} DataLoader, images/s "
              "(wall time over the timed batches; 1 read thread per worker):\n")
        print("| dataset | " + " | ".join(f"K={k}" for k in ks) + " |")
        print("| --- |" + " --- |" * len(ks))
        for label, name, size in [("cifar-like", cifar, None), ("jpeg256@64", jpeg, 64)]:
            rates = [time_grain(name, size, data_dir, _BATCH.value, _GRAIN_BATCHES.value, k) for k in ks]
            print(f"| {label} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if not _DATA_DIR.value:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
