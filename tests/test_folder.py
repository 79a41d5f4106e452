"""The user's image folders as datasets (``data.name = "folder:PATH"``): both layouts, what is read
from each file (EXIF orientation, greyscale and RGBA to RGB), unreadable files skipped and named,
change detection, clear errors, and a few training steps on a class folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import ImageDataset
from jaxdiff.data.folder import FolderError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8


def _rgb(seed, h=SIZE, w=SIZE):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _by_file(ds):
    """{relative file: (uint8 image, label or caption)} for every example of the dataset."""
    src = ds._source
    out = {}
    for ex in src.__getitems__(list(range(len(src)))):
        f = ex["file"].decode() if isinstance(ex["file"], bytes) else str(ex["file"])
        extra = ex["label"] if "label" in ex else (ex["caption"].decode() if "caption" in ex else None)
        out[f] = (np.asarray(ex["image"]), extra)
    return out


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "pets"
    (root / "dogs").mkdir(parents=True)
    (root / "cats").mkdir()
    images = {}
    for i in range(3):
        images[f"cats/{i}.png"] = _rgb(i)
        Image.fromarray(images[f"cats/{i}.png"]).save(root / "cats" / f"{i}.png")
        images[f"dogs/{i}.png"] = _rgb(10 + i)
        Image.fromarray(images[f"dogs/{i}.png"]).save(root / "dogs" / f"{i}.png")
    Image.fromarray(_rgb(20, 24, 32)).save(root / "dogs" / "photo.jpg", quality=95)  # JPEG, resized
    grey = (np.random.default_rng(21).random((SIZE, SIZE)) * 255).astype(np.uint8)
    Image.fromarray(grey, "L").save(root / "cats" / "grey.png")
    images["cats/grey.png"] = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([_rgb(22), np.full((SIZE, SIZE, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "rgba.png")
    images["cats/rgba.png"] = rgba[..., :3]
    upright = _rgb(23)
    rotated = Image.fromarray(np.rot90(upright, 2).copy())  # stored upside down, EXIF says rotate 180
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated.save(root / "dogs" / "exif.png", exif=exif)
    images["dogs/exif.png"] = upright
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "cats" / "notes.md").write_text("not an image: ignored")
    return root, images


def test_class_folder(class_folder, tmp_path, capfd):
    root, images = class_folder
    ds = ImageDataset(f"folder:{root}", "train", batch_size=4, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    err = capfd.readouterr().err
    assert "skipped 1 unreadable file(s): dogs/broken.png" in err and "10 images" in err
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2 and ds.num_examples == 10
    got = _by_file(ds)
    assert sorted(got) == sorted([*images, "dogs/photo.jpg"])
    for f, want in images.items():  # decoded exactly: same size, lossless PNG in and out
        np.testing.assert_array_equal(got[f][0], want, err_msg=f)
        assert got[f][1] == (0 if f.startswith("cats/") else 1)
    assert got["dogs/photo.jpg"][0].shape == (SIZE, SIZE, 3)  # centre-cropped and resized
    b = ds.batch(0)
    assert b["image"].shape == (4, SIZE, SIZE, 3) and set(b["label"]) <= {0, 1}
    # Unchanged folder: the same build, nothing rebuilt; a touched file: a new build.
    ImageDataset(f"folder:{root}", "train", batch_size=4, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    assert "Built" not in capfd.readouterr().err
    os.utime(root / "cats" / "0.png", ns=(1, 1))
    ImageDataset(f"folder:{root}", "train", batch_size=4, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    assert "Built" in capfd.readouterr().err
    assert len([d for d in os.listdir(tmp_path / "dd") if d.startswith("folder_")]) == 2


def test_captioned_folders(tmp_path):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    texts = {"a.png": "a red circle", "b.png": "a blue  square"}
    with open(jsonl / "metadata.jsonl", "w") as f:
        for name, text in texts.items():
            Image.fromarray(_rgb(len(name) + ord(name[0]))).save(jsonl / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    ds = ImageDataset(f"folder:{jsonl}", "train", batch_size=2, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    assert ds.annotation_keys == ("caption",) and ds.num_classes is None
    assert {f: c for f, (_, c) in _by_file(ds).items()} == texts
    assert sorted(ds.batch(0)["caption"]) == sorted(texts.values())
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(i)).save(txt / f"{i}.png")
        (txt / f"{i}.txt").write_text(f"caption\n number {i}\n")
    ds = ImageDataset(f"folder:{txt}", "train", batch_size=2, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    assert {f: c for f, (_, c) in _by_file(ds).items()} == {f"{i}.png": f"caption number {i}" for i in range(3)}
    os.remove(txt / "1.txt")
    with pytest.raises(FolderError, match=r"1 image\(s\) have no .txt caption beside them, e.g. '1.png'"):
        ImageDataset(f"folder:{txt}", "train", batch_size=2, image_size=SIZE, data_dir=str(tmp_path / "dd"))


def test_bad_folders_give_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    cases = [(tmp_path / "missing", "is not a directory"), (tmp_path / "empty", "has no images")]
    for path, match in cases:
        with pytest.raises(FolderError, match=match) as e:
            ImageDataset(f"folder:{path}", "train", batch_size=2, image_size=SIZE, data_dir=str(tmp_path / "dd"))
        assert "\n" not in str(e.value)
    with pytest.raises(FolderError, match="needs an image size"):
        ImageDataset(f"folder:{tmp_path / 'empty'}", "train", batch_size=2, data_dir=str(tmp_path / "dd"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"nope")
    with pytest.raises(FolderError, match=r"none of the 1 image files .* could be read \(e.g. x.png"):
        ImageDataset(f"folder:{broken}", "train", batch_size=2, image_size=SIZE, data_dir=str(tmp_path / "dd"))
    assert not [d for d in os.listdir(tmp_path / "dd") if d.startswith("folder_")]  # nothing half-built left
    # From the CLI: one line, nothing written.
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
                          f"--config.data.name=folder:{tmp_path / 'empty'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAXDIFF_DATA_DIR": str(tmp_path / "dd")})
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "has no images" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("xla_o0")
def test_a_class_folder_trains(class_folder, tmp_path):
    from _testutil import override
    from experiments.configs import ddpm_digits
    from jaxdiff.train.checkpoint import Checkpointer
    from jaxdiff.train.loop import train

    root, _ = class_folder
    config = override(ddpm_digits.get_config(), {
        "train.eval_every": 0, "data.name": f"folder:{root}", "data.image_size": SIZE, "data.data_dir": str(tmp_path / "dd"),
        "data.random_flip": True, "model.ch": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (),
        "model.num_groups": 8, "diffusion.num_timesteps": 100, "train.num_steps": 3, "train.batch_size": 4,
        "train.warmup_steps": 1, "train.log_every": 1, "train.checkpoint_every": 3, "train.num_samples": 4,
        "sample.num_steps": 2})
    summary = train(config, str(tmp_path / "run"))
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    meta = Checkpointer(str(tmp_path / "run"), read_only=True).restore_meta()
    assert meta["dataset"]["class_names"] == ["cats", "dogs"] and meta["model"]["num_classes"] == 2
    samples = np.load(tmp_path / "run" / "samples_final.npz")
    assert samples["images"].shape == (4, SIZE, SIZE, 3) and list(samples["labels"]) == [0, 1, 0, 1]
