"""jaxdiff.data: the embedded TFDS digits dataset, the deterministic, resumable batcher, the
per-dataset specs it consults, and the import structure of the package (no cycle)."""
import ast
import io
import os
import pathlib
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

import jaxdiff.data
from jaxdiff.data import (DatasetNotPreparedError, ImageDataset, default_data_dir, load_source,
                          real_images)
from jaxdiff.data import digits, shapes
from jaxdiff.data.builders import DatasetSpec
from jaxdiff.data.specs import SPECS, spec_of


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_data"))


def _read_all(source):
    examples = source.__getitems__(list(range(len(source))))
    return (np.stack([ex["image"] for ex in examples]), np.array([ex["label"] for ex in examples]),
            np.array([ex["index"] for ex in examples]))


def test_digits_reads_back_sklearn_pixels_and_labels(data_dir):
    sk = load_digits()
    expected = np.round(sk.images * 255 / 16).astype(np.uint8)
    seen = []
    for split, size in [("train", 1497), ("test", 300)]:
        images, labels, index = _read_all(load_source("digits", split, data_dir=data_dir))
        assert images.shape == (size, 8, 8, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[..., 0], expected[index])
        np.testing.assert_array_equal(labels, sk.target[index])
        seen.append(index)
    train, test = seen
    assert len(train) + len(test) == 1797
    assert not set(train) & set(test)
    assert sorted(np.concatenate(seen)) == list(range(1797))
    assert np.bincount(sk.target[test], minlength=10).tolist() == [30] * 10  # stratified
    files = os.listdir(os.path.join(data_dir, "digits", "1.0.0"))
    assert any(".array_record" in f for f in files), files
    assert not [f for f in os.listdir(data_dir) if f.startswith(".jaxdiff_build")]  # temp dirs cleaned


def test_concurrent_builds_are_safe(tmp_path):
    errors, sizes = [], []

    def build():
        try:
            sizes.append(len(load_source("digits", "test", data_dir=str(tmp_path))))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sizes == [300, 300]
    assert sorted(os.listdir(tmp_path)) == ["digits"]


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDIFF_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    assert default_data_dir("/some/where") == "/some/where"
    monkeypatch.delenv("JAXDIFF_DATA_DIR")
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert default_data_dir().endswith("tensorflow_datasets")


def test_batch_is_a_pure_function_of_seed_and_step(data_dir):
    a = ImageDataset("digits", "train", batch_size=32, seed=3, data_dir=data_dir)
    b = ImageDataset("digits", "train", batch_size=32, seed=3, data_dir=data_dir, cache_in_memory=False)
    for step in [7, 0, 46, 1000]:  # any order, past the first epoch, cached or not
        x, y = a.batch(step), b.batch(step)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    c = ImageDataset("digits", "train", batch_size=32, seed=4, data_dir=data_dir)
    assert not np.array_equal(a.batch(0)["label"], c.batch(0)["label"])
    assert (a.num_examples, a.num_classes, a.image_shape) == (1497, 10, (8, 8, 1))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterate_resumes_at_start_step(data_dir, prefetch):
    ds = ImageDataset("digits", "train", batch_size=64, seed=1, data_dir=data_dir)
    it = ds.iterate(start_step=5, prefetch=prefetch)
    for step in range(5, 9):
        got, want = next(it), ds.batch(step)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    it.close()


def test_a_process_reads_and_decodes_only_its_rows(data_dir):
    """batch(step, rows): one process's share of the global batch, equal to those rows of the whole
    batch (flips included), read from the source for those rows alone."""
    whole = ImageDataset("digits", "train", batch_size=16, image_size=8, seed=3, random_flip=True,
                         data_dir=data_dir, cache_in_memory=False)
    part = ImageDataset("digits", "train", batch_size=16, image_size=8, seed=3, random_flip=True,
                        data_dir=data_dir, cache_in_memory=False)
    read = []
    source = part._source

    class Counting:  # records which examples the process asks the array_record source for
        def __len__(self):
            return len(source)

        def __getitems__(self, keys):
            read.extend(keys)
            return source.__getitems__(keys)

    part._source = Counting()
    rows = np.arange(8, 16)
    for step in (0, 5, 200):  # 200: a batch in a later epoch
        a, b = whole.batch(step), part.batch(step, rows=rows)
        assert set(a) == set(b) == {"image", "label"}
        for k in a:
            np.testing.assert_array_equal(b[k], a[k][rows])
        assert sorted(read) == sorted(int(i) for i in whole.indices(step)[rows])
        read.clear()
    it = part.iterate(5, rows=rows)
    np.testing.assert_array_equal(next(it)["image"], whole.batch(5)["image"][rows])
    with pytest.raises(ValueError, match="rows must be int indices into the batch of 16"):
        part.batch(0, rows=[16])


def test_every_example_once_per_epoch(data_dir):
    ds = ImageDataset("digits", "train", batch_size=100, seed=0, data_dir=data_dir)
    n = ds.num_examples
    steps = -(-2 * n // 100) + 1
    order = np.concatenate([ds.indices(s) for s in range(steps)])
    for epoch in range(2):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])  # reshuffled each epoch
    # The batch content is the examples at those indices (batch 14 straddles epochs 0 and 1).
    images, labels = ds.examples(ds.indices(14))
    np.testing.assert_array_equal(ds.batch(14)["label"], labels)


def test_range_shape_and_resizing(data_dir):
    sk_index = _read_all(load_source("digits", "train", data_dir=data_dir))[2]
    native = ImageDataset("digits", "train", batch_size=16, data_dir=data_dir)
    b = native.batch(0)
    expected = np.round(load_digits().images * 255 / 16)[sk_index[native.indices(0)]]
    np.testing.assert_allclose(b["image"][..., 0], expected / 127.5 - 1, atol=1e-6)
    for size in [16, 32]:
        ds = ImageDataset("digits", "train", batch_size=16, image_size=size, data_dir=data_dir)
        b = ds.batch(3)
        assert ds.image_shape == (size, size, 1)
        assert b["image"].shape == (16, size, size, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert b["image"].min() == -1.0 and b["image"].max() > 0.9
    images, labels = real_images("digits", "test", 16, data_dir)
    assert images.shape == (300, 16, 16, 1) and images.dtype == np.uint8 and labels.dtype == np.int32


def test_random_flip_is_deterministic_and_mirrors(data_dir):
    plain = ImageDataset("digits", "train", batch_size=64, data_dir=data_dir)
    flip = ImageDataset("digits", "train", batch_size=64, data_dir=data_dir, random_flip=True)
    x, f = plain.batch(2)["image"], flip.batch(2)["image"]
    np.testing.assert_array_equal(f, flip.batch(2)["image"])
    same = np.all(f == x, axis=(1, 2, 3))
    mirrored = np.all(f == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and (~same).any() and (~mirrored).any()


def test_drop_labels(data_dir):
    ds = ImageDataset("digits", "train", batch_size=8, data_dir=data_dir, drop_labels=True)
    assert ds.num_classes is None and set(ds.batch(0)) == {"image"}


class TinyRgb(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A 20-example RGB dataset with non-square 12x10 images and no label: the generic TFDS path."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(12, 10, 3))}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(20):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
            yield i, {"image": buf.getvalue()}


def test_other_prepared_dataset_by_name(tmp_path):
    tfds.display_progress_bar(False)
    TinyRgb(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "downloads"))
    # Not registered: read back through tfds.builder from the files alone, like any prepared dataset.
    ds = ImageDataset("tiny_rgb", "train", batch_size=8, image_size=8, data_dir=str(tmp_path),
                      cache_in_memory=False)
    b = ds.batch(0)
    assert ds.num_classes is None and set(b) == {"image"}
    assert b["image"].shape == (8, 8, 8, 3) and -1 <= b["image"].min() and b["image"].max() <= 1
    images, labels = real_images("tiny_rgb", "train", None, str(tmp_path))
    assert images.shape == (20, 12, 10, 3) and labels is None


@pytest.mark.parametrize("name", ["mnist", "no_such_dataset_xyz"])
def test_unprepared_dataset_explains_how_to_build(data_dir, name):
    with pytest.raises(DatasetNotPreparedError) as info:
        ImageDataset(name, "train", batch_size=8, data_dir=data_dir)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"tfds build {name} --file_format=array_record --data_dir={data_dir}" in message
    assert data_dir in message and "download_and_prepare" in message
    assert not os.path.exists(os.path.join(data_dir, name))  # nothing created, nothing downloaded


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataset("digits", "train", batch_size=0, data_dir=data_dir)
    for size in [0, -8]:
        with pytest.raises(ValueError, match="image_size"):
            ImageDataset("digits", "train", batch_size=4, image_size=size, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"validation.*available.*'train'"):
        ImageDataset("digits", "validation", batch_size=4, data_dir=data_dir)
    with pytest.raises(ValueError, match="available"):
        load_source("digits", "dev", data_dir=data_dir)
    ds = ImageDataset("digits", "train", batch_size=4, data_dir=data_dir)
    with pytest.raises(ValueError, match="step"):
        ds.batch(-1)
    with pytest.raises(ValueError, match="start_step"):
        ds.iterate(start_step=-2)


# ------------------------------------------------------------------------------ dataset specs
def test_specs_registry():
    assert set(SPECS) == {"digits", "shapes"} and all(spec.name == name for name, spec in SPECS.items())
    assert SPECS["digits"] is digits.SPEC and SPECS["shapes"] is shapes.SPEC
    assert spec_of("shapes") is shapes.SPEC and spec_of("shapes:1.0.0") is shapes.SPEC
    assert spec_of("mnist") is None and spec_of("folder:/some/path") is None
    assert digits.SPEC.annotations == () and digits.SPEC.allows_random_flip and digits.SPEC.holdout is None
    assert shapes.SPEC.annotations == ("caption", "shape", "color", "position")
    assert not shapes.SPEC.allows_random_flip and shapes.SPEC.holdout is not None


def test_unknown_dataset_message_unchanged(tmp_path):
    data_dir = str(tmp_path)
    with pytest.raises(DatasetNotPreparedError) as info:
        ImageDataset("no_such_dataset_xyz", "train", batch_size=8, data_dir=data_dir)
    assert str(info.value) == (
        f"Dataset 'no_such_dataset_xyz' is not prepared in data dir {data_dir!r} (TFDS knows no such "
        "dataset and none is stored there).\n"
        "jaxdiff reads TFDS datasets in array_record format with tfds.data_source (no TensorFlow) "
        "and never downloads at run time. Prepare it once, on a machine with TensorFlow and "
        "internet access:\n"
        f"    tfds build no_such_dataset_xyz --file_format=array_record --data_dir={data_dir}\n"
        "or in Python:\n"
        f"    tfds.builder('no_such_dataset_xyz', data_dir={data_dir!r}, "
        "file_format='array_record').download_and_prepare()\n"
        f"then copy {os.path.join(data_dir, 'no_such_dataset_xyz')} into this machine's data dir "
        "(pass data_dir=..., or set JAXDIFF_DATA_DIR).")


def test_random_flip_and_holdout_follow_the_spec(tmp_path):
    data_dir = str(tmp_path)  # both refused before anything is built
    with pytest.raises(ValueError) as info:
        ImageDataset("shapes", "train", batch_size=4, data_dir=data_dir, random_flip=True)
    assert str(info.value) == ("random_flip would mirror shapes left-right away from the positions their "
                               "captions name; use random_flip=False for 'shapes'.")
    with pytest.raises(ValueError) as info:
        ImageDataset("digits", "train", batch_size=4, data_dir=data_dir, holdout="compositional")
    assert str(info.value) == ("holdout='compositional' needs a dataset with held-out label sets ('shapes'), "
                               "not 'digits'.")
    with pytest.raises(ValueError, match="Unknown holdout 'nope'"):
        ImageDataset("shapes", "train", batch_size=4, data_dir=data_dir, holdout="nope")
    assert os.listdir(data_dir) == []


def _odd_digits(examples, name):
    if name != "odd":
        raise ValueError(f"Unknown holdout {name!r}.")
    return np.array([ex["label"] % 2 == 1 for ex in examples], bool)


def test_pipeline_consults_the_registry(data_dir, monkeypatch):
    """A spec added to SPECS is all the pipeline needs: its builder, annotations, flips, holdouts."""
    monkeypatch.setitem(SPECS, "even_digits", DatasetSpec(
        "even_digits", digits.digits_builder, annotations=("index",), random_flip_error="no flips here.",
        holdout=_odd_digits))
    with pytest.raises(ValueError, match="^no flips here.$"):
        ImageDataset("even_digits", "test", batch_size=4, data_dir=data_dir, random_flip=True)
    with pytest.raises(ValueError, match="Unknown holdout 'nope'"):
        ImageDataset("even_digits", "test", batch_size=4, data_dir=data_dir, holdout="nope")
    ds = ImageDataset("even_digits", "test", batch_size=50, seed=0, data_dir=data_dir, holdout="odd")
    assert ds.num_examples == 150 and ds.annotation_keys == ("index",)  # 30 of each of 5 classes
    b = ds.batch(0)
    assert set(b) == {"image", "label", "index"} and (b["label"] % 2 == 0).all()
    full = ImageDataset("digits", "test", batch_size=50, seed=0, data_dir=data_dir)
    assert full.annotation_keys == () and full.num_examples == 300
    with pytest.raises(ValueError, match=r"held-out label sets \('shapes', 'even_digits'\), not 'digits'"):
        ImageDataset("digits", "test", batch_size=4, data_dir=data_dir, holdout="odd")


# --------------------------------------------------------------------------- import structure
DATA_PACKAGE = pathlib.Path(jaxdiff.data.__file__).parent


def _data_imports(source: str, modules: set) -> tuple[set, set]:
    """The ``jaxdiff.data`` modules (file stems; ``__init__`` for the package) that ``source``
    imports at module level, and those it imports inside a function."""
    top, nested = set(), set()

    def targets(node) -> set:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif node.level == 1:  # relative, inside jaxdiff/data
            base = "jaxdiff.data" + (f".{node.module}" if node.module else "")
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            names = []
        found = set()
        for name in names:
            if name != "jaxdiff.data" and not name.startswith("jaxdiff.data."):
                continue
            parts = name.split(".")[2:]
            found.add(parts[0] if parts and parts[0] in modules else "__init__")
        return found

    def visit(node, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (nested if in_function else top).update(targets(node))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return top, nested


def test_import_checker_sees_package_and_function_level_imports():
    modules = {"__init__", "pipeline", "shapes"}
    src = ("from jaxdiff.data import shapes as s, ImageDataset\nimport jaxdiff.data.pipeline\n"
           "def f():\n    from jaxdiff.data.pipeline import load_source\n    from . import shapes\n")
    assert _data_imports(src, modules) == ({"shapes", "__init__", "pipeline"}, {"pipeline", "shapes"})


def test_data_modules_import_each_other_without_a_cycle():
    files = {p.stem: p for p in DATA_PACKAGE.glob("*.py")}
    graph, lazy = {}, {}
    for name, path in files.items():
        graph[name], nested = _data_imports(path.read_text(), set(files))
        graph[name].discard(name)
        if nested:
            lazy[name] = sorted(nested)
    assert not lazy, f"function-level jaxdiff.data imports (a dodged cycle? import at the top): {lazy}"
    assert {"builders"} <= graph["shapes"] and {"specs", "builders"} <= graph["pipeline"]  # parsed for real
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle in jaxdiff/data: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
