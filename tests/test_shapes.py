"""jaxdiff.data.shapes (the captioned dataset), its ImageDataset batches, and jaxdiff.eval.shapes."""
import os

import numpy as np
import pytest
from scipy import ndimage

from jaxdiff.data import ImageDataset, shapes
from jaxdiff.eval import shapes as checks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_data"))


@pytest.fixture(scope="module")
def test_split(data_dir):
    return shapes.load_split("test", data_dir)  # builds both splits on first use


# ------------------------------------------------------------------------------------ dataset
def test_built_dataset_is_the_seeded_generator(data_dir, test_split):
    num, seed = shapes.SPLITS["test"]
    a, b = shapes.generate(num, seed), shapes.generate(num, seed)
    for k in a:  # same seed, same bytes
        assert a[k].tobytes() == b[k].tobytes(), k
    assert not np.array_equal(a["image"], shapes.generate(num, seed + 1)["image"])
    for k in ("image", "caption", "shape", "color", "position"):  # what TFDS stored and gave back
        np.testing.assert_array_equal(test_split[k], a[k], err_msg=k)
    np.testing.assert_array_equal(test_split["index"], np.arange(num))
    img = test_split["image"]
    assert img.shape == (num, 32, 32, 3) and img.dtype == np.uint8
    files = os.listdir(os.path.join(data_dir, "shapes", shapes.SHAPES_VERSION))
    assert any(".array_record" in f for f in files), files
    assert not [f for f in os.listdir(data_dir) if f.startswith(".jaxdiff_build")]
    train = ImageDataset("shapes", "train", batch_size=1, data_dir=data_dir)
    assert train.num_examples == shapes.SPLITS["train"][0] == 10_000
    # The splits come from different seeds (4x supersampling quantises positions and sizes to
    # ~1/4 px, so a few identical renderings recur: 3 of 1000 here).
    train_imgs = shapes.generate(1000, shapes.SPLITS["train"][1])["image"]
    shared = set(map(bytes, train_imgs.reshape(1000, -1))) & set(map(bytes, img.reshape(num, -1)))
    assert len(shared) < 10


def test_images_show_their_labels(test_split):
    img, n = test_split["image"], len(test_split["image"])
    rgb = shapes.COLOR_RGB[test_split["color"]].astype(bool)
    # Pure colours: off channels are 0 everywhere, on channels are equal, the interior is 255.
    assert not np.any(img * ~rgb[:, None, None, :])
    on = np.where(rgb[:, None, None, :], img, img.max(-1, keepdims=True))
    assert np.all(on.min(-1) == on.max(-1))
    assert np.all(img.reshape(n, -1).max(1) == 255)
    for i in range(0, n, 50):  # exactly one shape of 7-11 px, near its cell centre
        mask = img[i].max(-1) > 0
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        ys, xs = np.nonzero(mask)
        assert 7 <= xs.max() + 1 - xs.min() <= 11 and 7 <= ys.max() + 1 - ys.min() <= 11
        centre = shapes.cell_centers()[test_split["position"][i]]
        assert np.abs([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2] - centre).max() <= 1.5


def test_captions_match_labels(test_split):
    assert shapes.caption(0, 0, 0) == "a red circle at the top left"
    assert shapes.caption(1, 2, 4) == "a blue square in the center"
    assert shapes.caption(2, 1, 5) == "a green triangle on the right"
    assert shapes.caption(0, 6, 7) == "a white circle at the bottom"
    labels = np.stack([test_split[k] for k in ("shape", "color", "position")], 1)
    templates = set()
    for text, lab in zip(test_split["caption"], labels):
        assert shapes.parse_caption(text) == tuple(lab)
        t = [j for j in range(len(shapes.TEMPLATES)) if shapes.caption(*lab, j) == text]
        assert len(t) == 1, text
        templates.add(t[0])
    assert templates == set(range(len(shapes.TEMPLATES)))
    grid = shapes.all_labels()
    assert grid.shape == (189, 3) and len({tuple(r) for r in grid}) == 189
    for j in range(len(shapes.TEMPLATES)):
        prompts = shapes.all_prompts(j)
        assert len(set(prompts)) == 189
        assert [shapes.parse_caption(p) for p in prompts] == [tuple(r) for r in grid]
    with pytest.raises(ValueError, match="Not a shapes caption"):
        shapes.parse_caption("a purple hexagon somewhere")


def test_labels_are_balanced():
    for num, seed in shapes.SPLITS.values():
        ex = shapes.generate(num, seed)
        combo = (ex["shape"] * 7 + ex["color"]) * 9 + ex["position"]
        assert set(np.bincount(combo, minlength=189)) <= {num // 189, num // 189 + 1}
        for k, classes in (("shape", 3), ("color", 7), ("position", 9)):
            counts = np.bincount(ex[k], minlength=classes)
            assert counts.min() >= 0.95 * num / classes and counts.max() <= 1.05 * num / classes, (k, counts)


# ----------------------------------------------------------------------------------- pipeline
def test_image_dataset_batches_carry_captions(data_dir):
    ds = ImageDataset("shapes", "train", batch_size=16, image_size=32, seed=0, data_dir=data_dir)
    assert ds.annotation_keys == ("caption", "shape", "color", "position") and ds.num_classes is None
    b = ds.batch(3)
    assert set(b) == {"image", "caption", "shape", "color", "position"}
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0
    assert b["caption"].shape == (16,) and b["caption"].dtype.kind == "U"
    for k in ("shape", "color", "position"):
        assert b[k].shape == (16,) and b[k].dtype == np.int32
    for text, *lab in zip(b["caption"], b["shape"], b["color"], b["position"]):
        assert shapes.parse_caption(text) == tuple(lab)
    uint8 = np.round((b["image"] + 1) * 127.5).astype(np.uint8)
    got = checks.predict(uint8)
    for k in ("shape", "color", "position"):
        np.testing.assert_array_equal(got[k], b[k])
    # Pure in (seed, step), cached or not; iterate() yields the same batches.
    uncached = ImageDataset("shapes", "train", batch_size=16, seed=0, data_dir=data_dir, cache_in_memory=False)
    it = ds.iterate(start_step=3, prefetch=1)
    for other in (uncached.batch(3), next(it), ds.batch(3)):
        for k in b:
            np.testing.assert_array_equal(other[k], b[k])
    it.close()
    np.testing.assert_array_equal(ds.annotations(ds.indices(3))["caption"], b["caption"])
    assert set(ImageDataset("shapes", "test", batch_size=4, data_dir=data_dir, drop_labels=True).batch(0)) == {"image"}
    with pytest.raises(ValueError, match="random_flip"):
        ImageDataset("shapes", "train", batch_size=4, data_dir=data_dir, random_flip=True)


def test_compositional_holdout_leaves_only_triples_unseen():
    held = shapes.holdout_labels("compositional")
    assert held.shape == (21, 3) and held.dtype == np.int32
    assert len({tuple(r) for r in held}) == 21
    everything = shapes.all_labels()
    mask = shapes.is_held_out(everything, "compositional")
    assert mask.sum() == 21
    seen = everything[~mask]
    # every attribute value and every pair of attributes still occurs among the 168 seen triples
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs_all = {(r[a], r[b]) for r in everything}
        assert {(r[a], r[b]) for r in seen} == pairs_all, (a, b)
    with pytest.raises(ValueError, match="Unknown holdout 'nope'"):
        shapes.holdout_labels("nope")


def test_image_dataset_holdout(data_dir):
    full = ImageDataset("shapes", "test", batch_size=32, seed=0, data_dir=data_dir)
    ds = ImageDataset("shapes", "test", batch_size=32, seed=0, data_dir=data_dir, holdout="compositional")
    every = np.stack([full.annotations(np.arange(full.num_examples))[k] for k in ("shape", "color", "position")], 1)
    kept = np.flatnonzero(~shapes.is_held_out(every, "compositional"))
    # labels are balanced (5 or 6 of each of the 189 combinations in 1000): 21 x 5-6 examples go
    assert ds.num_examples == len(kept) and 21 * 5 <= full.num_examples - ds.num_examples <= 21 * 6
    assert "holdout='compositional'" in repr(ds)
    # one epoch of batches: the kept examples, each once, none held out; images match the split's
    steps = ds.num_examples // ds.batch_size
    got = np.concatenate([np.stack([ds.batch(i)[k] for k in ("shape", "color", "position")], 1) for i in range(steps)])
    assert not shapes.is_held_out(got, "compositional").any()
    idx = np.concatenate([ds.indices(i) for i in range(steps)])
    assert len(np.unique(idx)) == len(idx) and idx.max() < ds.num_examples
    np.testing.assert_array_equal(ds.examples(idx[:5])[0], full.examples(kept[idx[:5]])[0])
    np.testing.assert_array_equal(ds.annotations(idx[:5])["caption"], full.annotations(kept[idx[:5]])["caption"])
    with pytest.raises(ValueError, match="Unknown holdout"):
        ImageDataset("shapes", "train", batch_size=4, data_dir=data_dir, holdout="nope")
    with pytest.raises(ValueError, match="needs a dataset with"):  # before building digits
        ImageDataset("digits", "train", batch_size=4, data_dir=data_dir, holdout="compositional")
    assert not os.path.exists(os.path.join(data_dir, "digits"))


# ----------------------------------------------------------------------------------- checkers
def _ids(split):
    return split["shape"], split["color"], split["position"]


def test_checkers_are_right_on_the_real_test_split(test_split):
    result = checks.adherence(test_split["image"], *_ids(test_split))
    for k in ("shape", "color", "position", "all"):
        assert result[f"{k}_accuracy"] > 0.99, result  # issue requirement: > 99% on real images
    assert result["shape_chance"] == 1 / 3 and result["color_chance"] == 1 / 7
    assert result["position_chance"] == 1 / 9 and result["all_chance"] == 1 / 189
    assert result["empty_fraction"] == 0 and result["num_images"] == 1000
    assert checks.adherence_to_captions(test_split["image"], test_split["caption"]) == result


def test_checkers_tolerate_blur_and_noise(test_split):
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(test_split["image"] * 0.8, (0, 0.8, 0.8, 0)) + rng.normal(0, 10, (1000, 32, 32, 3))
    result = checks.adherence(np.clip(np.round(x), 0, 255).astype(np.uint8), *_ids(test_split))
    assert min(result[f"{k}_accuracy"] for k in ("shape", "color", "position")) > 0.97, result


def test_checkers_see_wrong_attributes(test_split):
    img, (shape, color, position) = test_split["image"], _ids(test_split)
    # Colours rotated (R<-G, G<-B, B<-R): red becomes blue etc.; only white still matches.
    rotated = img[..., [1, 2, 0]]
    result = checks.adherence(rotated, shape, color, position)
    white = np.mean(color == shapes.COLORS.index("white"))
    assert result["color_accuracy"] == pytest.approx(white) and result["color_accuracy"] < 0.2
    assert result["shape_accuracy"] > 0.99 and result["position_accuracy"] > 0.99
    rgb = shapes.COLOR_RGB[color][:, [1, 2, 0]]
    want = [next(j for j, c in enumerate(shapes.COLOR_RGB) if (c == r).all()) for r in rgb]
    np.testing.assert_array_equal(checks.predict_color(rotated), want)
    # Mirrored left-right: positions off the middle column are wrong.
    mirrored = checks.predict_position(img[:, :, ::-1])
    col = shapes.POSITION_GRID[position, 1]
    np.testing.assert_array_equal(mirrored, position + 2 - 2 * col)
    # Shapes: a square where a circle was asked for is not a circle; turned triangles are triangles.
    asked = checks.adherence(img, (shape + 1) % 3, color, position)
    assert asked["shape_accuracy"] < 0.01 and asked["color_accuracy"] > 0.99
    np.testing.assert_array_equal(checks.predict_shape(img.transpose(0, 2, 1, 3)), shape)
    # Nothing drawn: no attribute is right.
    blank = checks.predict(np.zeros((2, 32, 32, 3), np.uint8))
    assert all((v == -1).all() for v in blank.values())


def test_checker_arguments_are_validated(test_split):
    img = test_split["image"][:4]
    with pytest.raises(ValueError, match="uint8"):
        checks.predict(img.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        checks.predict(img[..., :1])
    with pytest.raises(ValueError, match="color_ids"):
        checks.adherence(img, np.zeros(4, int), np.full(4, 7), np.zeros(4, int))
    with pytest.raises(ValueError, match="shape_ids"):
        checks.adherence(img, np.zeros(3, int), np.zeros(4, int), np.zeros(4, int))
