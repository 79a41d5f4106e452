"""Text-to-image trained from scratch: the word tokenizer over the shapes captions, the text-
conditioned U-Net (padding never matters), tokenized batches (pixel and latent), caption dropout,
an end-to-end tiny run on ``shapes`` (train, resume, sample by prompt from Python and the CLI,
guidance), and the bad-input rules."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _testutil import override
from experiments.configs import t2i_shapes
from jaxdiff import config as config_lib
from jaxdiff import generation, runs
from jaxdiff.data.captions import TokenizedCaptions
from jaxdiff.data.latent import LatentDataset
from jaxdiff.train import build
from jaxdiff.data import ImageDataset, shapes
from jaxdiff.eval.shapes import adherence_to_captions
from jaxdiff.train.loop import train

pytestmark = [pytest.mark.usefixtures("xla_o0"), pytest.mark.slow]  # slow: end-to-end training runs


# A pixel-space (vae.workdir "") 8x8 t2i_shapes with one transformer block: compiles fast.
T2I_TINY = {
    "train.eval_every": 0,  # in-training evaluation: tests/test_eval_in_training.py
    "vae.workdir": "",
    "data.image_size": 8,
    "model.block_out_channels": (16, 32),
    "model.down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "model.up_block_types": ("UpBlock2D", "UpBlock2D"),
    "model.mid_block_type": "",
    "model.attention_head_dim": 2,
    "text.hidden_size": 16,
    "text.intermediate_size": 32,
    "text.num_layers": 1,
    "text.num_heads": 2,
    "diffusion.num_timesteps": 100,
    "train.num_steps": 4,
    "train.batch_size": 8,
    "train.warmup_steps": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 5,
    "train.num_samples": 0,
    "sample.num_steps": 3,
}


def tiny_config():
    return override(t2i_shapes.get_config(), T2I_TINY)


@pytest.fixture(scope="module")
def model():
    return build.build_model(tiny_config(), (8, 8, 3), None)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("t2i_run"))
    summary = train(tiny_config(), workdir)
    return workdir, summary


def test_vocabulary_covers_every_caption(model):
    tok = model.tokenizer
    for t in range(len(shapes.TEMPLATES)):
        for p in shapes.all_prompts(t):
            ids = tok.encode(p)
            assert tok.unk_token_id not in ids, p
            assert tok.decode(ids) == p.lower()
            assert len(ids) + 2 <= model.max_length
    # Distinct captions get distinct ids.
    assert len({tuple(tok.encode(p)) for p in shapes.all_prompts(0)}) == shapes.NUM_PROMPTS


def test_tokenize_frames_and_rejects_bad_prompts(model):
    ids, mask = model.tokenize(["a red circle at the top", ""])
    tok = model.tokenizer
    assert ids.shape == mask.shape == (2, model.max_length) and ids.dtype == np.int32
    words = [tok.encoder[w] for w in "a red circle at the top".split()]
    np.testing.assert_array_equal(ids[0, :8], [tok.bos_token_id, *words, tok.eos_token_id])
    np.testing.assert_array_equal(mask[0], [1] * 8 + [0] * (model.max_length - 8))
    np.testing.assert_array_equal(ids[1, :2], [tok.bos_token_id, tok.eos_token_id])
    assert mask[1].sum() == 2 and (ids[0, 8:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="outside the model's vocabulary.*'purple'"):
        model.tokenize(["a purple circle"])
    with pytest.raises(ValueError, match="at most 14"):
        model.tokenize(["a red circle " * 5])
    with pytest.raises(ValueError, match="must be strings"):
        model.tokenize([3])


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def params(model):
    return jax.jit(model.init_params)(jax.random.key(1))


def test_padding_tokens_never_matter(model, apply, params):
    ids, mask = model.tokenize(["a blue square on the left", "there is a white triangle at the bottom"])
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = jnp.array([10.0, 70.0])
    out = apply(params, x, t, ids, mask)
    other = np.where(mask == 0, model.tokenizer.encoder["red"], ids)  # real words at padded positions
    np.testing.assert_allclose(apply(params, x, t, other, mask), out, rtol=1e-6, atol=1e-6)
    # ...while a real word changes the output.
    changed = ids.copy()
    changed[0, 2] = model.tokenizer.encoder["red"]  # "blue" -> "red"
    diff = np.abs(np.asarray(apply(params, x, t, changed, mask)) - np.asarray(out))
    assert diff[0].max() > 1e-4 and diff[1].max() < 1e-6
    # Encoding once, then the U-Net alone (what sampling does) is the same function.
    ctx = model.encode_text(params, ids, mask)
    denoise = jax.jit(model.context_model_fn)
    np.testing.assert_allclose(denoise(x, t, (ctx, mask), params=params), out, rtol=1e-5, atol=1e-6)


def test_caption_dropout_uses_the_empty_caption(model, apply, params):
    ids, mask = model.tokenize(["a red circle at the top left"] * 4)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    t = jnp.full((4,), 30.0)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    key = jax.random.key(3)
    null_ids, null_mask = model.tokenize([""] * 4)
    dropped = jax.jit(model.train_apply_fn(p_uncond=1.0))(params, x, t, batch, key)
    kept = jax.jit(model.train_apply_fn(p_uncond=0.0))(params, x, t, batch, key)
    np.testing.assert_allclose(dropped, apply(params, x, t, null_ids, null_mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept, apply(params, x, t, ids, mask), rtol=1e-5, atol=1e-6)


def test_tokenized_batches_match_their_captions(data_dir, model):
    ds = ImageDataset("shapes", "train", batch_size=8, image_size=8, seed=0)
    wrapped = TokenizedCaptions(ds, model)
    assert wrapped.image_shape == ds.image_shape and wrapped.num_examples == ds.num_examples
    raw, batch = ds.batch(5), wrapped.batch(5)
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    np.testing.assert_array_equal(batch["image"], raw["image"])
    ids, mask = model.tokenize(list(raw["caption"]))
    np.testing.assert_array_equal(batch["input_ids"], ids)
    np.testing.assert_array_equal(batch["attention_mask"], mask)
    it = wrapped.iterate(5)
    np.testing.assert_array_equal(next(it)["input_ids"], ids)
    with pytest.raises(ValueError, match="needs captions"):
        TokenizedCaptions(ImageDataset("shapes", "train", batch_size=8, image_size=8, drop_labels=True), model)


def test_latent_batches_carry_the_captions(data_dir):
    """LatentDataset keeps the image dataset's captions in step with the latents (a stand-in
    autoencoder: the latents are the pixel means, so each latent can be matched to its caption)."""
    images = ImageDataset("shapes", "train", batch_size=8, image_size=8, seed=0)

    class MeanEncoder:
        vae = dataclasses.make_dataclass("V", ["latent_shape"])((1, 1, 3))
        workdir, step, scale_factor = "stand-in", 0, 1.0

        def encode(self, pixels):
            m = pixels.reshape(len(pixels), -1, 3).astype(np.float32).mean(1)[:, None, None, :]
            return m, np.zeros_like(m)

    latents = LatentDataset(images, MeanEncoder(), sample_posterior=False)
    b, raw = latents.batch(3), images.batch(3)
    np.testing.assert_array_equal(b["caption"], raw["caption"])
    np.testing.assert_allclose(b["image"][:, 0, 0], ((raw["image"] + 1) * 127.5).reshape(8, -1, 3).mean(1), atol=1e-3)
    # One process's rows: the same rows of the whole batch, captions with their latents.
    rows = np.array([1, 5, 6])
    encoder = MeanEncoder()
    encoded = []
    encoder.encode = lambda pixels: (encoded.append(len(pixels)), MeanEncoder.encode(encoder, pixels))[1]
    part = LatentDataset(images, encoder, sample_posterior=False).batch(3, rows=rows)
    np.testing.assert_array_equal(part["caption"], b["caption"][rows])
    np.testing.assert_array_equal(part["image"], b["image"][rows])
    assert encoded == [len(np.unique(images.indices(3)[rows]))]  # only this process's examples encoded


def test_tiny_run_trains_and_samples_by_prompt(data_dir, tiny_run):
    """(Resume is the shared loop's, tested in test_train; text batches are pure in the step, above.)"""
    workdir, summary = tiny_run
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    run = runs.load_run(workdir)
    assert run.model.text_conditional and set(run.params) == {"text_encoder", "unet"}
    assert list(run.config.text.words) == shapes.vocabulary()  # the tokenizer travels with the checkpoint

    prompts = ["a red circle at the top left", "a blue square in the center"] * 2
    key = jax.random.key(7)

    def gen(prompts, guidance):  # batches of 2: one compiled sampler per guidance mode
        return generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts, key=key,
                                       guidance=guidance, batch_size=2)

    a, b, c = gen(prompts, 3.0), gen(prompts, 3.0), gen(prompts, 1.0)
    assert a.shape == (4, 8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # same key, same images
    assert not np.array_equal(a, c)  # guidance changes them
    # Batch i uses fold_in(key, i): the first batch equals a 2-prompt call.
    np.testing.assert_array_equal(gen(prompts[:2], 3.0), a[:2])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        generation.generate_text(run.model, run.params, run.schedule, run.config, prompts=prompts, key=key,
                                guidance=3.0, batch_size=0)
    with pytest.raises(ValueError, match="text-conditioned"):
        generation.generate(run.model, run.params, run.schedule, run.config, num=2, key=key)


def _sample_cli(*args):
    from absl import flags

    from experiments import sample

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sample", *args])
    return sample.main(["sample"])


def test_sample_cli_by_prompt(data_dir, tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    out = str(tmp_path / "s")
    assert _sample_cli(f"--workdir={workdir}", "--prompt=a green triangle on the right",
                       "--prompt=a white square at the bottom", "--num=4", "--batch_size=2", f"--out={out}") == 0
    saved = np.load(out + ".npz")
    assert saved["images"].shape == (4, 8, 8, 3)
    assert list(saved["prompts"]) == ["a green triangle on the right", "a white square at the bottom"] * 2
    assert os.path.exists(out + ".png") and "one column per prompt" in capsys.readouterr().out
    # python -m jaxdiff.eval scores such a file for prompt adherence.
    from jaxdiff.eval.__main__ import main as eval_main

    assert eval_main(["--samples", out + ".npz", "--json", out + ".json"]) == 0
    assert "shapes prompt adherence" in capsys.readouterr().out
    with open(out + ".json") as f:
        assert json.load(f) == adherence_to_captions(saved["images"], list(saved["prompts"]))
    assert _sample_cli(f"--workdir={workdir}", "--prompt=a purple blob", f"--out={out}") == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert _sample_cli(f"--workdir={workdir}", "--labels=3", f"--out={out}") == 2
    assert "--prompt, not --labels" in capsys.readouterr().err


def test_adherence_eval_on_untrained_model_is_near_chance(data_dir, tiny_run):
    """The eval script's figures are computed from the images: a 4-step model adheres at chance."""
    from jaxdiff.eval.t2i import evaluate

    run = runs.load_run(tiny_run[0])
    prompts, images, results = evaluate(run, [1.0, 5.0], templates=1, batch_size=2)
    assert images.shape == (2, 189, 8, 8, 3) and len(prompts) == 189
    for g, r in results.items():
        assert r["num_images"] == 189
        assert r["all_accuracy"] < 0.1  # chance is 1/189; a trained model is far above
        np.testing.assert_allclose(r["color_accuracy"], adherence_to_captions(images[[1.0, 5.0].index(g)], prompts)["color_accuracy"])
        assert "held_out" not in r
    # A run trained with data.holdout: the held-out combinations' prompts are also scored apart.
    run = dataclasses.replace(run, config=config_lib.replace(run.config, data={"holdout": "compositional"}))
    prompts, images, results = evaluate(run, [1.0], templates=1, batch_size=2)
    r = results[1.0]
    held = shapes.is_held_out(shapes.all_labels(), "compositional")
    assert (r["held_out"]["num_prompts"], r["seen"]["num_prompts"]) == (21, 168)
    for part, m in (("held_out", held), ("seen", ~held)):
        ref = adherence_to_captions(images[0][m], [p for p, k in zip(prompts, m) if k])
        assert {k: v for k, v in r[part].items() if k != "num_prompts"} == ref


def test_bad_configs_give_clear_errors(data_dir, tmp_path):
    c = tiny_config()
    c.data.conditional = False  # no captions in the batches
    with pytest.raises(ValueError, match="needs captions"):
        train(c, str(tmp_path / "a"))
    c = tiny_config()
    c.data.name = "digits"
    c.data.conditional = True
    with pytest.raises(ValueError, match="takes captions, not class labels"):
        train(c, str(tmp_path / "b"))
    c = tiny_config()
    c.model.type = "transformer"
    with pytest.raises(ValueError, match="model.type must be"):
        train(c, str(tmp_path / "c"))
