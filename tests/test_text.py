"""CLIP text encoder and tokenizers: parity with transformers' CLIPTextModel / CLIPTokenizer on
tiny randomly initialised models and a tiny BPE vocabulary built here (no downloads), weight
loading, precision, and input validation.

Compiles are kept cheap (one jit per model config, LLVM's expensive passes off).
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop.clip import (clip_text_config_from_transformers,
                                  clip_text_params_from_transformers, load_transformers_clip_text)
from jaxdiff.nn.text import CLIPTextTransformer
from jaxdiff.tokenizers import CLIPTokenizer, WordTokenizer, bytes_to_unicode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Tokenizer: a tiny byte-level BPE (all 256 byte symbols, with and without </w>, some merges).

_MERGES = ["h e", "l l", "he ll", "hell o</w>", "t h", "th e</w>", "c a", "ca t</w>", "a t</w>",
           "o n", "on e</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>",
           "a n", "an d</w>", "i n", "in g</w>", "e r", "er s</w>", "' s</w>", "r e",
           "i t</w>", "! !</w>", "! !", "!! ?</w>", "1 2", "h a", "ha t</w>"]
_TEXTS = [
    "a photo of a cat", "Hello the CAT!!", "  HELLO\t\n  the \r\n dog  ", "It's one, two. 123!",
    "the cat's hat; dogs & cats (and 42 photos) #1 @home 3.14 100%", "éclair naïve café",
    "你好 world", "emoji 🐱🐶 ok", "ΟΔΟΣ İstanbul straße", "hello<|endoftext|>cat",
    "hello <|ENDOFTEXT|> cat", "<|startoftext|>one", "a\x00b\x1cc\x85d\xa0e\u3000f\u200bg",
    "", "   ", "don't you'll we've I'M they'RE", "x" * 5 + " " + "the " * 40, "...!!!???",
    "tab\tseparated\u2028lines",
]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    for m in _MERGES:
        a, b = m.split(" ")
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return str(d / "vocab.json"), str(d / "merges.txt")


@pytest.mark.parametrize("max_length,padding", [(77, "max_length"), (8, "max_length"),
                                                (16, "longest")])
def test_clip_tokenizer_matches_transformers(bpe_files, max_length, padding):
    ref = transformers.CLIPTokenizer(*bpe_files)
    ours = CLIPTokenizer.from_files(*bpe_files)
    want = ref(_TEXTS, max_length=max_length, padding=padding, truncation=True)
    got = ours(_TEXTS, max_length=max_length, padding=padding, truncation=True)
    assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
    for i, text in enumerate(_TEXTS):
        assert got["input_ids"][i].tolist() == want["input_ids"][i], text
        assert got["attention_mask"][i].tolist() == want["attention_mask"][i], text
    assert ours.tokenize("hello the cat") == ["hello</w>", "the</w>", "cat</w>"]
    assert ours.decode(got["input_ids"][1]) == ref.decode(want["input_ids"][1],
                                                          skip_special_tokens=True)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_clip_tokenizer_folder_configs(bpe_files, tmp_path, variant):
    """SD 1.x folders pad with <|endoftext|>; SD 2.x with '!', which transformers also treats
    as a special token inside the text; 'normalized' special tokens match after lower-casing."""
    for f in bpe_files:
        shutil.copy(f, tmp_path)
    tok = lambda c: {"content": c, "lstrip": False, "normalized": True,  # noqa: E731
                     "rstrip": False, "single_word": False}
    pad = "<|endoftext|>" if variant == "sd1" else "!"
    specials = {"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"),
                "unk_token": tok("<|endoftext|>"), "pad_token": pad}
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({**specials, "model_max_length": 12, "do_lower_case": True,
                   "tokenizer_class": "CLIPTokenizer"}, f)
    with open(tmp_path / "special_tokens_map.json", "w") as f:
        json.dump(specials, f)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = CLIPTokenizer.from_folder(str(tmp_path))
    assert ours.pad_token_id == ref.pad_token_id and ours.model_max_length == 12
    texts = ["hello!", "hello <|ENDOFTEXT|> cat", "hello<|endoftext|>cat", "<|STARTOFTEXT|>x"]
    want = ref(texts, max_length=12, padding="max_length", truncation=True)
    got = ours(texts)
    assert got["input_ids"].tolist() == want["input_ids"]
    assert got["attention_mask"].tolist() == want["attention_mask"]


def test_tokenizer_errors(bpe_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTokenizer.from_files(str(tmp_path / "vocab.json"), bpe_files[1])
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTokenizer.from_folder(str(tmp_path / "nope"))
    with open(bpe_files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    with pytest.raises(ValueError, match="absent from the vocabulary"):
        CLIPTokenizer(vocab, [("h", "e"), ("zz", "q")])
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer(vocab, [], pad_token="<pad>")
    tok = CLIPTokenizer(vocab, [])
    with pytest.raises(ValueError, match="equal length"):
        tok(["a", "a b"], padding=False)
    with pytest.raises(ValueError, match="no room"):
        tok("a", max_length=1)
    with pytest.raises(TypeError, match="strings"):
        tok(["a", 3])
    long = tok("a " * 100, max_length=10, truncation=False)  # not cut: longer than max_length
    assert long["input_ids"].shape == (1, 102)


def test_word_tokenizer():
    tok = WordTokenizer(["a", "photo", "of", "Cat", "dog", "cat", "."], model_max_length=8)
    assert tok.vocab_size == 2 + 6 + 2 and tok.eos_token_id == tok.vocab_size - 1
    out = tok(["A photo of a cat.", "a zebra", "a a a a a a a a a"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (3, 8) and ids.dtype == np.int32 and mask.dtype == np.int32
    w = tok.encoder
    assert ids[0].tolist() == [tok.bos_token_id, w["a"], w["photo"], w["of"], w["a"], w["cat"],
                               w["."], tok.eos_token_id]
    assert ids[1].tolist()[:4] == [tok.bos_token_id, w["a"], tok.unk_token_id, tok.eos_token_id]
    assert ids[1, 4:].tolist() == [tok.pad_token_id] * 4 and mask[1].tolist() == [1] * 4 + [0] * 4
    assert ids[2, -1] == tok.eos_token_id and mask[2].all()  # truncated, eos kept
    assert tok.decode(ids[0]) == "a photo of a cat ."
    assert tok(["a", "a of"], padding="longest")["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="single word"):
        WordTokenizer(["two words"])


# ---------------------------------------------------------------------------------------------
# Model parity against transformers' CLIPTextModel.

_TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, pad_token_id=1)
# Legacy (eos_token_id=2): pooled at argmax(ids); SD 1.x-style rows padded with the eos id 99.
# Non-legacy (eos 50, not the largest id): pooled at the first 50; rows hold larger ids.
_CASES = {
    "legacy_eos2": (dict(eos_token_id=2, hidden_act="quick_gelu"),
                    [[0, 5, 6, 7, 99, 99, 99, 99], [0, 9, 99, 99, 99, 99, 99, 99],
                     [0, 3, 4, 5, 6, 7, 8, 99]]),
    "eos50_gelu": (dict(eos_token_id=50, hidden_act="gelu", layer_norm_eps=1e-6),
                   [[0, 75, 98, 7, 50, 50, 50, 50], [0, 60, 50, 1, 1, 1, 1, 1],
                    [0, 3, 90, 5, 51, 7, 8, 50]]),
}
_MASK = np.array([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5, [1] * 8], np.int32)


@pytest.fixture(scope="module", params=sorted(_CASES))
def saved_clip(request, tmp_path_factory):
    extra, ids = _CASES[request.param]
    cfg = transformers.CLIPTextConfig(**_TINY, **extra)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():  # move every tensor (LayerNorm 1/0 included) off its default init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(folder), safe_serialization=True)
    ids = np.array(ids, np.int32)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(_MASK).long(),
                    output_hidden_states=True)
        skip1 = model.final_layer_norm(out.hidden_states[-2])
    ref = dict(last=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
               hidden=[h.numpy() for h in out.hidden_states], skip1=skip1.numpy())
    return str(folder), ids, ref


def _run(module, params, ids, mask):
    @jit
    def f(params, ids, mask):
        full = module.apply({"params": params}, ids, mask, output_hidden_states=True)
        skip = module.apply({"params": params}, ids, mask, clip_skip=1)
        return full, skip
    return f(params, ids, mask)


def test_clip_text_parity(saved_clip):
    folder, ids, ref = saved_clip
    module, params = load_transformers_clip_text(folder)
    assert module.eos_token_id == json.load(open(os.path.join(folder, "config.json")))[
        "eos_token_id"]
    (last, pooled, hidden), (skip_last, skip_pooled) = _run(module, params, ids, _MASK)
    errs = dict(last=_rel_err(last, ref["last"]), pooled=_rel_err(pooled, ref["pooled"]),
                skip1=_rel_err(skip_last, ref["skip1"]),
                hidden=max(_rel_err(h, r) for h, r in zip(hidden, ref["hidden"])))
    print("parity rel errors:", errs)
    assert len(hidden) == len(ref["hidden"]) == 3
    assert last.dtype == pooled.dtype == jnp.float32
    assert all(e < 1e-4 for e in errs.values()), errs
    np.testing.assert_array_equal(skip_pooled, pooled)  # pooled always from full depth

    # The converted tree is exactly the module's own parameter tree.
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), abstract["params"])
            == jax.tree.map(lambda x: (x.shape, x.dtype), params))


def test_clip_text_prefixed_keys_and_bf16(saved_clip, tmp_path):
    """transformers 4.x / SD folders prefix keys with 'text_model.' and keep position_ids."""
    folder, ids, ref = saved_clip
    from safetensors.numpy import load_file
    sd = load_file(os.path.join(folder, "model.safetensors"))
    prefixed = {f"text_model.{k}": v for k, v in sd.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(16)[None]
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    save_file(prefixed, str(tmp_path / "model.safetensors"))
    module, params = load_transformers_clip_text(str(tmp_path), dtype=jnp.bfloat16)
    _, params32 = load_transformers_clip_text(folder)
    jax.tree.map(np.testing.assert_array_equal, params, params32)
    # bf16 compute, fp32 params (the module creates float32 params even in bf16).
    init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
    last, pooled = jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, ids, _MASK)
    assert last.dtype == jnp.float32 and np.isfinite(np.asarray(last)).all()
    err = _rel_err(last, ref["last"])
    print("bf16 rel error:", err)
    assert err < 3e-2


def test_clip_text_input_errors(saved_clip):
    folder, ids, _ = saved_clip
    module, params = load_transformers_clip_text(folder)
    apply = lambda *a, **k: module.apply({"params": params}, *a, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        apply(ids[0])
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        apply(ids[None])
    with pytest.raises(ValueError, match="integers"):
        apply(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        apply(np.concatenate([ids[:, :-1], np.full((3, 1), 100, np.int32)], axis=1))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        apply(-ids)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        apply(np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        apply(ids, _MASK[:, :4])
    with pytest.raises(ValueError, match="clip_skip"):
        apply(ids, clip_skip=3)


def test_clip_loader_errors(saved_clip, tmp_path):
    folder, _, _ = saved_clip
    with pytest.raises(FileNotFoundError, match="not found"):
        load_transformers_clip_text(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_transformers_clip_text(str(tmp_path))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_transformers_clip_text(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle is never loaded"):
        load_transformers_clip_text(str(tmp_path))

    from safetensors.numpy import load_file
    sd = load_file(os.path.join(folder, "model.safetensors"))
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert clip_text_params_from_transformers(sd).keys() == \
        clip_text_params_from_transformers(sd, cfg).keys()
    with pytest.raises(ValueError, match=r"unexpected keys.*text_projection"):
        clip_text_params_from_transformers({**sd, "text_projection.weight": np.zeros((4, 32))})
    with pytest.raises(ValueError, match="same parameter"):
        clip_text_params_from_transformers(
            {**sd, "text_model.final_layer_norm.bias": sd["final_layer_norm.bias"]})
    no_fc2 = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.weight"}
    for c in (None, cfg):
        with pytest.raises(ValueError, match=r"missing keys.*encoder\.layers\.1\.mlp\.fc2\.weight"):
            clip_text_params_from_transformers(no_fc2, c)
    with pytest.raises(ValueError, match=r"missing keys.*encoder\.layers\.2\."):
        clip_text_params_from_transformers(sd, {**cfg, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="shape mismatches.*token_embedding"):
        clip_text_params_from_transformers(sd, {**cfg, "vocab_size": 101})
    with pytest.raises(ValueError, match="model_type"):
        clip_text_config_from_transformers({"model_type": "clip"})
    with pytest.raises(ValueError, match="hidden_act"):
        clip_text_config_from_transformers({**cfg, "hidden_act": "relu"})


def test_tokenizer_to_encoder_end_to_end():
    """WordTokenizer output feeds the encoder; pooled sits at eos under both pooling rules."""
    tok = WordTokenizer(["a", "red", "cat", "dog"], model_max_length=6)
    batch = tok(["a red cat", "dog"])
    for eos in (2, tok.eos_token_id):
        enc = CLIPTextTransformer(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16,
                                  num_layers=1, num_heads=2, max_position_embeddings=6,
                                  eos_token_id=eos)
        init_apply = lambda ids, mask, enc=enc: enc.apply(  # noqa: E731
            enc.init(jax.random.key(0), ids), ids, mask)
        last, pooled = jit(init_apply)(batch["input_ids"], batch["attention_mask"])
        at_eos = last[np.arange(2), np.argmax(batch["input_ids"] == tok.eos_token_id, axis=1)]
        np.testing.assert_allclose(pooled, at_eos, rtol=0, atol=0)
