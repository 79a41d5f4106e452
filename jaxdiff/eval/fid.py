"""FID, Inception Score and precision/recall with pytorch-fid's FID Inception (:mod:`jaxdiff.nn.inception`).

    >>> from jaxdiff.eval.fid import FIDEvaluator, reference_stats
    >>> from jaxdiff.interop.inception import load_inception
    >>> ev = FIDEvaluator(load_inception("inception_fid.safetensors"))
    >>> ev.ref = reference_stats("cifar10:train", ev)    # or "stats.npz" (mu, sigma) / "images.npz"
    >>> ev.fid(samples)                                   # samples: uint8 [N, H, W, 3] (or [..., 1])

In the training loop: build ``FIDEvaluator(params, ref_stats)`` once (the Inception program is
compiled on the first call and kept), then ``ev.fid(images)`` on each round's N samples; every
process calls it with the same images (each reads only its rows) and gets the same float.
``ev.evaluate(images, inception=True)`` adds the Inception Score; ``ev.features(images)`` /
``ev.stats(images)`` are the parts.

Images: uint8 ``[N, H, W, 3]``; greyscale ``[N, H, W, 1]`` is repeated to 3 channels (what
pytorch-fid's loader does with ``Image.convert('RGB')``). They become float32 ``x / 255`` as in
pytorch-fid's ``ToTensor``, then the network resizes them to 299 x 299 (torch's bilinear, no
antialias) and maps them to [-1, 1].

Sharding: batches of ``batch_size`` images (rounded up to a multiple of the mesh's devices; the last
one padded with its last image, padding dropped) run as one jitted call split over the mesh's
``data`` x ``fsdp`` devices, every process placing only its own rows (``parallel.host_rows`` /
``global_batch``). The Inception params are replicated. Statistics: each process adds the float64
sum and sum of outer products of its own rows' pool3 features on the host (NumPy); at the end the
per-process float64 sums travel between processes bit-exactly (as uint32 pairs: JAX's x64 is off)
and are added in process order, so every process holds the same mean and covariance. Features for
the Inception Score and precision/recall are gathered whole onto every process.

Definitions (float64 NumPy on the host):
- :func:`frechet_distance`: pytorch-fid's ``calculate_frechet_distance`` (``scipy.linalg.sqrtm``;
  ``eps`` added to the diagonals when the product is singular; an imaginary part above 1e-3 raises).
- :func:`inception_score`: exp(E_x KL(p(y|x) || p(y))) over ``splits`` contiguous splits, softmax
  over all 1008 logits; mean and std (ddof 0) over the splits, as openai/improved-gan. The
  evaluator passes the fc logits without bias (``logits_unbiased``), as that code does.
- :func:`precision_recall`: Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models": a real feature's radius is the Euclidean distance to its k-th
  nearest other real feature; precision = the fraction of fake features within some real
  feature's radius; recall = the fraction of real features within some fake feature's radius
  (radii from the fake set).

Reference statistics (:func:`reference_stats`): an ``.npz`` of statistics (``mu`` [2048],
``sigma`` [2048, 2048]: the files pytorch-fid, DDPM and EDM publish), an ``.npz`` of ``images``
(uint8 [N, H, W, C]), or a TFDS dataset split ``NAME:SPLIT`` (``cifar10:train``; read with
``tfds.data_source``, never downloaded: :mod:`jaxdiff.data.pipeline`). A dataset's statistics are
cached in ``cache_dir`` (default ``<data dir>/fid_stats``; TFDS slices such as ``cifar10:train[:10000]`` work too) as
``NAME_SPLIT_<weights fingerprint>.npz`` with ``mu``, ``sigma``, ``num_images``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
import scipy.linalg
from tqdm import tqdm

from jaxdiff import parallel, xla
from jaxdiff.nn.inception import FEATURE_DIM, INPUT_SIZE, InceptionV3, resize_bilinear


class Stats(NamedTuple):
    """Gaussian statistics of pool3 features: ``mu [D]``, ``sigma [D, D]`` float64, ``n`` images (0 if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0


# ----------------------------------------------------------------------------- the metrics
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), float64; pytorch-fid's
    ``calculate_frechet_distance`` (the same steps: sqrtm of the product, ``eps`` on both diagonals
    if that is not finite, the real part if the imaginary one is within 1e-3)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"the statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (both must come from the same network's features).")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns about a singular product; the result is checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(sigma1 sigma2): the "
                             "covariances are too ill-conditioned (use more images than feature dimensions).")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """``logits: [N, C]`` -> (mean, std) over ``splits`` contiguous splits of
    exp(mean_x KL(softmax(logits_x) || mean_x' softmax(logits_x'))), float64."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"inception_score needs logits [N, C] with N >= splits >= 1, got {logits.shape} and "
                         f"splits={splits}.")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    n, scores = logits.shape[0], []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        py = p.mean(axis=0)
        # 0 log 0 = 0: a class with p(y|x) = 0 adds nothing (p(y) > 0 wherever p(y|x) > 0)
        terms = np.where(p > 0, p * (part - np.log(np.where(py > 0, py, 1.0))), 0.0)
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radii(feats: np.ndarray, k: int, block: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row (float64)."""
    sq = np.einsum("ij,ij->i", feats, feats)
    radii = np.empty(len(feats))
    for lo in range(0, len(feats), block):
        d2 = sq[lo:lo + block, None] + sq[None, :] - 2 * feats[lo:lo + block] @ feats.T
        # the row's own distance is 0: the k-th nearest other row is the (k+1)-th smallest
        radii[lo:lo + block] = np.sqrt(np.maximum(np.partition(d2, k, axis=1)[:, k], 0))
    return radii


def _covered(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """For each query: is it within ``radii[j]`` of some ``points[j]``?"""
    sq_p = np.einsum("ij,ij->i", points, points)
    out = np.empty(len(queries), bool)
    for lo in range(0, len(queries), block):
        q = queries[lo:lo + block]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + sq_p[None, :] - 2 * q @ points.T
        out[lo:lo + block] = (np.sqrt(np.maximum(d2, 0)) <= radii[None, :]).any(axis=1)
    return out


def precision_recall(real_feats, fake_feats, k: int = 3, *, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake_feats [M, D]`` against
    ``real_feats [N, D]``, float64 NumPy in blocks of ``block`` rows (O((N + M)^2 D) work)."""
    real, fake = np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs features [N, D] and [M, D], got {real.shape} and {fake.shape}.")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k} must be in 1..{min(len(real), len(fake)) - 1} (fewer than the features of each set).")
    precision = _covered(fake, real, _kth_radii(real, k, block), block).mean()
    recall = _covered(real, fake, _kth_radii(fake, k, block), block).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- accumulation
class MomentSums:
    """float64 sums over feature rows: ``n``, ``total [D]`` (sum of x) and ``outer [D, D]`` (sum of x x^T)."""

    def __init__(self, dim: int):
        self.n, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def stats(self) -> Stats:
        """Mean and unbiased covariance (``np.cov``'s, ddof 1)."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}.")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return Stats(mu, (sigma + sigma.T) / 2, self.n)


def allgather_float64(x: np.ndarray) -> np.ndarray:
    """``x`` (float64, the same shape on every process) -> ``[process_count, *x.shape]`` float64,
    bit-exact: sent as uint32 pairs through ``process_allgather`` (JAX's x64 is off, so float64
    through JAX would be rounded to float32)."""
    x = np.ascontiguousarray(x, np.float64)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    words = multihost_utils.process_allgather(x.view(np.uint32))
    return np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.float64).reshape(jax.process_count(), *x.shape)


def combine_processes(sums: MomentSums) -> MomentSums:
    """Every process's :class:`MomentSums` added in process order (the same result on every process)."""
    if jax.process_count() == 1:
        return sums
    packed = np.concatenate([[float(sums.n)], sums.total, sums.outer.ravel()])
    allp = allgather_float64(packed)
    out = MomentSums(len(sums.total))
    for row in allp:  # process order
        out.n += int(row[0])
        out.total += row[1:1 + len(sums.total)]
        out.outer += row[1 + len(sums.total):].reshape(sums.outer.shape)
    return out


def _local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process holds, in row order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    parts = {}
    for shard in x.addressable_shards:
        lo = shard.index[0].indices(x.shape[0])[0]
        parts.setdefault(lo, np.asarray(shard.data))
    return np.concatenate([parts[k] for k in sorted(parts)])


# ----------------------------------------------------------------------------- the evaluator
def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be uint8 [N, H, W, 3] or [N, H, W, 1], got {images.dtype} "
                         f"{list(images.shape)} (convert [-1, 1] floats with jaxdiff.images.to_uint8).")
    return images


def params_fingerprint(params) -> str:
    """SHA-256 (16 hex digits) of the Inception params' bytes: names cached statistics."""
    from jaxdiff.interop._common import flatten_params

    h = hashlib.sha256()
    for path, v in sorted(flatten_params(params).items()):
        h.update("/".join(path).encode())
        h.update(np.ascontiguousarray(np.asarray(v, np.float32)).tobytes())
    return h.hexdigest()[:16]


def _prepare(images):
    """uint8 [B, H, W, 1 or 3] -> float32 [B, 299, 299, 3] in [-1, 1]: ``x / 255`` (pytorch-fid's
    ToTensor), greyscale repeated to RGB, torch's bilinear resize, ``2 x - 1``."""
    x = images.astype("float32") / 255.0
    if x.shape[-1] == 1:
        x = x.repeat(3, axis=-1)
    return 2 * resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE)) - 1


def _network(p, x):
    out = InceptionV3(resize_input=False, normalize_input=False).apply({"params": p}, x)
    return {"pool3": out["pool3"], "logits": out["logits_unbiased"]}


@functools.lru_cache(maxsize=None)
def _features_fn():
    """``(params, images uint8 [B, H, W, 1 or 3]) -> {"pool3" [B, 2048], "logits" [B, 1008]}``
    (``logits``: the fc without bias). Two jitted programs shared by every evaluator: the input
    preparation (compiled per image shape, small) and the network on 299 x 299 (compiled once per
    batch size and mesh), so a new sample resolution does not recompile the network."""
    prepare, network = xla.jit(_prepare), xla.jit(_network)
    return lambda p, images: network(p, prepare(images))


class FIDEvaluator:
    """pool3 features / logits of uint8 images with the FID Inception, sharded over ``mesh``.

    ``params``: :func:`jaxdiff.interop.inception.load_inception`'s. ``ref``: default reference
    statistics for :meth:`fid` / :meth:`evaluate` (:func:`reference_stats`). ``mesh``: default all devices
    (``parallel.make_mesh()``). ``batch_size``: images per jitted call (rounded up to a multiple of
    the devices). Every process must call every method with the same arguments (same images, or a
    reader that returns them); every process gets the same results.
    """

    def __init__(self, params, ref: Optional[Stats] = None, *, batch_size: int = 50, mesh=None,
                 progress: bool = False):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        devices = parallel.batch_devices(self.mesh)
        self.batch_size = -(-int(batch_size) // devices) * devices
        self.rows = parallel.host_rows(self.batch_size, self.mesh)  # this process reads only these
        self.progress = progress
        self.params = jax.device_put(params, parallel.replicated(self.mesh))
        self.ref = ref
        self._fingerprint = None
        self._fn = _features_fn()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = params_fingerprint(jax.device_get(self.params))
        return self._fingerprint

    def _run(self, read: Callable[[np.ndarray], np.ndarray], n: int, *, gather: tuple = (), desc: str = "fid"):
        """Batches over images ``0..n-1`` (``read(indices) -> uint8 [k, H, W, C]``): float64 moment
        sums of pool3 (all processes combined) and the gathered ``gather`` outputs ``[n, ...]``."""
        if n < 1:
            raise ValueError("no images to evaluate.")
        size, rows = self.batch_size, self.rows
        sums, kept = MomentSums(FEATURE_DIM), {k: [] for k in gather}
        bar = tqdm(total=n, desc=desc, disable=not (self.progress and parallel.is_writer()), dynamic_ncols=True)

        def consume(out, lo):  # host work on a finished batch: float64 sums of this process's real rows
            valid = rows < n - lo  # not the padding of the last batch
            sums.add(_local_rows(out["pool3"])[valid])
            m = min(size, n - lo)
            for k in gather:
                kept[k].append(parallel.to_host(out[k])[:m])
            bar.update(m)

        pending = None
        for lo in range(0, n, size):
            idx = np.minimum(np.arange(lo, lo + size), n - 1)  # the last batch padded with its last image
            local = check_images(read(idx[rows]))
            out = self._fn(self.params, parallel.global_batch(local, rows, size, self.mesh))  # dispatched, not awaited
            if pending is not None:  # the previous batch's host work overlaps this one's compute
                consume(*pending)
            pending = (out, lo)
        consume(*pending)
        bar.close()
        return combine_processes(sums), {k: np.concatenate(v) for k, v in kept.items()}

    def features(self, images: np.ndarray) -> dict:
        """``images`` uint8 [N, H, W, 1 or 3] -> ``{"pool3": [N, 2048], "logits": [N, 1008]}`` float32
        NumPy on every process (``logits``: the fc without its bias, for the Inception Score)."""
        images = check_images(images)
        _, out = self._run(lambda i: images[i], len(images), gather=("pool3", "logits"))
        return out

    def stats(self, images: np.ndarray) -> Stats:
        """Mean and covariance (float64) of the pool3 features of ``images``."""
        images = check_images(images)
        sums, _ = self._run(lambda i: images[i], len(images))
        return sums.stats()

    def stats_from_reader(self, read: Callable[[np.ndarray], np.ndarray], n: int, *, desc: str = "fid") -> Stats:
        """:meth:`stats` of images ``0..n-1`` read on demand (each process reads only its rows)."""
        sums, _ = self._run(read, n, desc=desc)
        return sums.stats()

    def _ref(self, ref: Optional[Stats]) -> Stats:
        ref = self.ref if ref is None else ref
        if ref is None:
            raise ValueError("no reference statistics: pass ref= to FIDEvaluator(...) or to this call "
                             "(jaxdiff.eval.fid.reference_stats).")
        return ref

    def fid(self, images: np.ndarray, ref: Optional[Stats] = None) -> float:
        """FID of ``images`` (uint8 [N, H, W, C]) against ``ref`` (default: the evaluator's ``ref``)."""
        ref = self._ref(ref)
        s = self.stats(images)
        return frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

    def evaluate(self, images: np.ndarray, ref: Optional[Stats] = None, *, inception: bool = False,
                 real_feats: Optional[np.ndarray] = None, k: int = 3, splits: int = 10) -> dict:
        """``{"fid", "num_images"}``, plus ``"is", "is_std"`` (``inception``) and ``"precision",
        "recall"`` (when ``real_feats [M, 2048]`` are given), from one pass over ``images``."""
        images, ref = check_images(images), self._ref(ref)
        gather = (("logits",) if inception else ()) + (("pool3",) if real_feats is not None else ())
        sums, out = self._run(lambda i: images[i], len(images), gather=gather, desc="fid samples")
        s = sums.stats()
        result = {"fid": frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma), "num_images": s.n}
        if inception:
            result["is"], result["is_std"] = inception_score(out["logits"], splits=min(splits, len(images)))
        if real_feats is not None:
            result["precision"], result["recall"] = precision_recall(real_feats, out["pool3"], k=k)
        return result


# ----------------------------------------------------------------------------- reference statistics
def load_stats_npz(path: str) -> Stats:
    """``mu`` / ``sigma`` from an ``.npz`` (pytorch-fid's / DDPM's / EDM's statistics files). ValueError otherwise."""
    return _stats_from(read_npz(path, "statistics", ("mu", "sigma", "num_images")), path)


def _stats_from(f: dict, path: str) -> Stats:
    if "mu" not in f or "sigma" not in f:
        raise ValueError(f"{path!r} has no 'mu' and 'sigma' arrays (it has {f['__files__']}).")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    n = int(f["num_images"]) if "num_images" in f else 0
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path!r}: mu {list(mu.shape)} / sigma {list(sigma.shape)} are not pool3 statistics "
                         f"([{FEATURE_DIM}] and [{FEATURE_DIM}, {FEATURE_DIM}]).")
    return Stats(mu, sigma, n)


def save_stats_npz(path: str, stats: Stats, **extra) -> None:
    """Write ``mu``, ``sigma``, ``num_images`` (and ``extra`` arrays) atomically; process 0 only."""
    if not parallel.is_writer():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.n), **extra)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dataset_stats(name: str, split: str, ev: FIDEvaluator, data_dir: Optional[str],
                   cache_dir: Optional[str]) -> Stats:
    from jaxdiff.data import ImageDataset
    from jaxdiff.data.pipeline import default_data_dir

    cache_dir = cache_dir or os.path.join(default_data_dir(data_dir), "fid_stats")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}_{split}")
    path = os.path.join(cache_dir, f"{safe}_{ev.fingerprint}.npz")
    if os.path.isfile(path):
        return load_stats_npz(path)
    ds = ImageDataset(name, split, batch_size=1, data_dir=data_dir, drop_labels=True, cache_in_memory=False)
    stats = ev.stats_from_reader(lambda idx: ds.examples(idx)[0], ds.num_examples, desc=f"fid {name}:{split}")
    save_stats_npz(path, stats, dataset=np.str_(f"{name}:{split}"), weights=np.str_(ev.fingerprint))
    parallel.sync("jaxdiff-fid-stats-cache")
    return stats


def read_npz(path: str, what: str, keys: Optional[tuple] = None) -> dict:
    """``{name: array}`` of an .npz (only ``keys`` that are present, when given); one-line ValueError
    for a file NumPy cannot read (not a zip, truncated, pickled objects)."""
    import zipfile

    try:
        f = np.load(path, allow_pickle=False)
        if not hasattr(f, "files"):
            raise ValueError("a .npy array, not an .npz archive")
        with f:
            return {k: f[k] for k in f.files if keys is None or k in keys} | {"__files__": list(f.files)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {what} {path!r} as an npz file ({' '.join(str(e).split())[:160]}).") from None


def parse_ref(ref: str) -> tuple[str, Optional[str], Optional[str]]:
    """("npz", path, None) or ("dataset", name, split); one-line errors for anything else."""
    ref = os.fspath(ref)
    if ref.endswith(".npz") or os.path.isfile(ref):
        if not os.path.isfile(ref):
            raise FileNotFoundError(f"reference {ref!r} does not exist (give an .npz of mu/sigma or images, or a "
                                    "dataset NAME:SPLIT such as cifar10:train).")
        return "npz", ref, None
    base, sliced = ref, ""
    if ref.endswith("]") and "[" in ref:  # TFDS slicing, e.g. cifar10:train[:10000]
        base, sliced = ref[:ref.rindex("[")], ref[ref.rindex("["):]
    name, sep, split = base.rpartition(":")
    split += sliced
    if not sep or not name or not split or split == sliced:
        raise ValueError(f"reference {ref!r} is not an .npz file (mu/sigma or images) nor a dataset NAME:SPLIT "
                         "such as cifar10:train.")
    return "dataset", name, split


def reference_images(ref: str, n: Optional[int] = None, *, data_dir: Optional[str] = None) -> np.ndarray:
    """The first ``n`` (default all) images of ``ref`` (an ``images`` .npz or a dataset ``NAME:SPLIT``), uint8,
    e.g. the real set of :func:`precision_recall`. ValueError for a statistics-only .npz."""
    kind, a, b = parse_ref(ref)
    if kind == "dataset":
        from jaxdiff.data import ImageDataset

        ds = ImageDataset(a, b, batch_size=1, data_dir=data_dir, drop_labels=True, cache_in_memory=False)
        return check_images(ds.examples(np.arange(min(n or ds.num_examples, ds.num_examples)))[0])
    f = read_npz(a, "reference", ("images",))
    if "images" not in f:
        raise ValueError(f"reference {a!r} has no 'images' (it has {f['__files__']}): precision/recall needs real "
                         "images (an images .npz or a dataset NAME:SPLIT), not statistics.")
    return check_images(f["images"][:n], f"'images' of {a!r}")


def reference_stats(ref: str, ev: FIDEvaluator, *, data_dir: Optional[str] = None,
                    cache_dir: Optional[str] = None) -> Stats:
    """Reference statistics from ``ref``: an ``.npz`` with ``mu`` and ``sigma`` (used as they are), an
    ``.npz`` with ``images`` (uint8 [N, H, W, C]: their statistics), or ``NAME:SPLIT`` of a prepared
    TFDS dataset (e.g. ``cifar10:train``; cached in ``cache_dir``, see the module docstring).

    Raises ValueError / FileNotFoundError (one line) for anything else."""
    kind, ref, split = parse_ref(ref)
    if kind == "npz":
        f = read_npz(ref, "reference", ("mu", "sigma", "num_images", "images"))
        if "mu" in f or "sigma" in f:
            return _stats_from(f, ref)
        if "images" in f:
            return ev.stats(check_images(f["images"], f"'images' of {ref!r}"))
        raise ValueError(f"reference {ref!r} has neither 'mu' and 'sigma' (statistics) nor 'images' (it has "
                         f"{f['__files__']}).")
    return _dataset_stats(ref, split, ev, data_dir, cache_dir)
