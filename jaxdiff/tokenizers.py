"""Text tokenizers producing ``{"input_ids", "attention_mask"}`` int32 NumPy arrays [B, L].

* :class:`CLIPTokenizer`: CLIP's byte-level BPE, reading ``vocab.json`` + ``merges.txt`` (a
  Stable Diffusion ``tokenizer/`` folder on the Hub) or ``tokenizer.json`` (what transformers 5
  ``save_pretrained`` writes). Ids equal transformers' ``CLIPTokenizer`` (the
  tokenizers-backed one of transformers 5; the slow tokenizer without ftfy agrees except for
  CJK characters and control characters, which it splits/drops differently).
* :class:`WordTokenizer`: a word-level vocabulary for the small embedded datasets.

Host-side, pure Python (+ ``regex`` for Unicode classes); no jax, torch or network.

The CLIP pipeline, step by step as transformers/tokenizers run it:
1. split the raw text on special tokens (exact match, longest first);
2. normalise the rest: NFC, every run of Unicode whitespace -> " ", lower case (per character);
   special tokens flagged ``normalized`` in the tokenizer config are matched here, after;
3. pre-tokenise with CLIP's pattern (``'s|'t|...|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``, single
   digits), then GPT-2's byte-level pattern, and map UTF-8 bytes to printable unicode;
4. BPE each word with ``</w>`` appended to its last symbol; symbols missing from the vocabulary
   become the unknown token;
5. ``[bos] + ids[:max_length - 2] + [eos]``, padded with the pad token (mask 0).
"""
from __future__ import annotations

import functools
import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import regex

_CLIP_PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                          r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_BYTELEVEL_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                               r"""|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")  # `regex`'s \s is Unicode White_Space, as tokenizers' onig


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pad_batch(seqs: list, max_length: int, padding: Union[bool, str], pad_id: int) -> dict:
    longest = max((len(s) for s in seqs), default=0)
    if padding in ("max_length",):
        target = max(max_length, longest)
    elif padding in (True, "longest"):
        target = longest
    elif padding in (False, "do_not_pad"):
        if len({len(s) for s in seqs}) > 1:
            raise ValueError("padding=False needs sequences of equal length to form a [B, L] "
                             "array; use padding='longest' or 'max_length'")
        target = longest
    else:
        raise ValueError(f"padding={padding!r}: use 'max_length', 'longest'/True or False")
    ids = np.full((len(seqs), target), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), target), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_list(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be a string or a sequence of strings, got items of type {bad}")
    return texts


def _frame(ids: list, bos: int, eos: int, max_length: int, truncation: bool) -> list:
    if truncation:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the bos and eos tokens")
        ids = ids[:max_length - 2]
    return [bos] + ids + [eos]


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer.

    vocab: token -> id (``vocab.json``); merges: ordered pairs (``merges.txt``, rank = line);
    special tokens as in transformers (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``).
    ``normalized_special``: special tokens matched after normalisation (lower-casing) rather
    than on the raw text; :meth:`from_folder` derives it from the tokenizer config files.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 model_max_length: int = 77, normalized_special: Sequence[str] = ()):
        self.encoder = {str(k): int(v) for k, v in vocab.items()}
        self.decoder = {v: k for k, v in self.encoder.items()}
        merges = [tuple(m) for m in merges]
        missing = [m for m in merges if len(m) != 2 or m[0] not in self.encoder
                   or m[1] not in self.encoder or m[0] + m[1] not in self.encoder]
        if missing:
            raise ValueError(f"CLIPTokenizer: {len(missing)} merges use or produce tokens absent "
                             f"from the vocabulary, e.g. {missing[:5]}")
        self.bpe_ranks = dict(zip(merges, range(len(merges))))  # later duplicates win
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                          ("unk", unk_token)):
            if tok not in self.encoder:
                raise ValueError(f"CLIPTokenizer: {role}_token {tok!r} is not in the vocabulary")
        self.model_max_length = int(model_max_length)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {v: k for k, v in self._byte_encoder.items()}
        specials = {bos_token, eos_token, pad_token, unk_token}
        norm = {t for t in normalized_special if t in specials}
        self._raw_special = _alternation(specials - norm)
        self._norm_special = _alternation({self._normalize(t) for t in norm})
        self._norm_special_ids = {self._normalize(t): self.encoder[t] for t in norm}
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    # -- construction from files -------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, **kwargs) -> "CLIPTokenizer":
        """Read ``vocab.json`` and ``merges.txt`` (``#version`` header and blank lines skipped)."""
        for f in (vocab_file, merges_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"CLIPTokenizer: {f} not found")
        with open(vocab_file, encoding="utf-8") as fh:
            vocab = json.load(fh)
        merges = []
        with open(merges_file, encoding="utf-8") as fh:
            for n, line in enumerate(fh.read().split("\n")):
                if not line.strip() or (n == 0 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"CLIPTokenizer: {merges_file} line {n + 1} is not "
                                     f"'left right': {line!r}")
                merges.append(tuple(parts))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_folder(cls, folder: str) -> "CLIPTokenizer":
        """A ``tokenizer/`` folder in either layout: ``vocab.json`` + ``merges.txt`` (Stable
        Diffusion checkpoints on the Hub), or else only ``tokenizer.json`` (what transformers >= 5
        ``save_pretrained`` writes; its BPE ``model`` holds the vocabulary and merges). Optional
        ``tokenizer_config.json`` and ``special_tokens_map.json`` (the latter wins) set the
        bos/eos/pad/unk tokens and ``model_max_length``.

        With vocab.json + merges.txt, ``model_max_length`` is read from tokenizer_config.json,
        and a special token given as a dict with ``"normalized": true`` in every place it
        appears is matched after lower-casing, as transformers does. With tokenizer.json,
        ``model_max_length`` may come from either file and special tokens are always matched on
        the raw text.

        A missing folder, or one with neither layout, raises FileNotFoundError; a tokenizer.json
        without a BPE model raises ValueError.
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CLIPTokenizer: folder {folder} not found")
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
            max_len, kwargs, normalized = _special_token_settings(folder)
            return cls.from_files(vocab_file, merges_file, model_max_length=max_len,
                                  normalized_special=normalized, **kwargs)
        tj = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"CLIPTokenizer: {folder} has neither vocab.json + merges.txt "
                                    "nor tokenizer.json: not a CLIP tokenizer folder")
        with open(tj, encoding="utf-8") as fh:
            model = json.load(fh).get("model", {})
        if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ValueError(f"CLIPTokenizer: {tj} does not hold a BPE model (vocab + merges)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in model["merges"]]
        max_len, kwargs, _ = _special_token_settings(folder, max_length_in_any_file=True)
        return cls(model["vocab"], merges, model_max_length=max_len, **kwargs)

    # -- ids of special tokens ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    bos_token_id = property(lambda self: self.encoder[self.bos_token])
    eos_token_id = property(lambda self: self.encoder[self.eos_token])
    pad_token_id = property(lambda self: self.encoder[self.pad_token])
    unk_token_id = property(lambda self: self.encoder[self.unk_token])

    # -- the pipeline ------------------------------------------------------------------------
    @staticmethod
    def _normalize(text: str) -> str:
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)  # per character: no final-sigma rule

    def _bpe_uncached(self, word: str) -> tuple:
        """BPE of one byte-mapped word -> token strings (last carries ``</w>``)."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(((self.bpe_ranks.get(p, np.inf), p) for p in zip(symbols, symbols[1:])),
                       key=lambda rp: rp[0])
            if best[0] == np.inf:
                break
            (first, second), merged, i = best[1], [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def _encode_normalized(self, text: str) -> list:
        unk = self.unk_token_id
        ids = []
        for piece in _CLIP_PAT.findall(text):
            for word in _BYTELEVEL_PAT.findall(piece):
                mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder.get(t, unk) for t in self._bpe(mapped))
        return ids

    def encode(self, text: str) -> list:
        """Token ids of ``text`` without bos/eos, no truncation."""
        ids = []
        for raw, is_special in _split(text, self._raw_special):
            if is_special:
                ids.append(self.encoder[raw])
                continue
            for piece, sp in _split(self._normalize(raw), self._norm_special):
                ids.extend([self._norm_special_ids[piece]] if sp else
                           self._encode_normalized(piece))
        return ids

    def tokenize(self, text: str) -> list:
        """Token strings of ``text`` (no bos/eos)."""
        return [self.decoder[i] for i in self.encode(text)]

    def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None,
                 padding: Union[bool, str] = "max_length", truncation: bool = True) -> dict:
        """texts -> {"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}.

        Each row is ``[bos] + ids + [eos]`` (ids cut to max_length - 2 when ``truncation``),
        then pad tokens with mask 0. ``max_length`` defaults to ``model_max_length`` (77).
        ``padding``: 'max_length' (L = max_length, or longer rows when truncation=False),
        'longest'/True (L = longest row), False (rows must already be equal in length).
        """
        max_length = self.model_max_length if max_length is None else int(max_length)
        seqs = [_frame(self.encode(t), self.bos_token_id, self.eos_token_id, max_length,
                       truncation) for t in _as_list(texts)]
        return _pad_batch(seqs, max_length, padding, self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids -> text, as transformers: bytes decoded, ``</w>`` -> " ", stripped."""
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id}
        chars = "".join(self.decoder[i] for i in np.asarray(ids).reshape(-1).tolist()
                        if not (skip_special_tokens and i in special))
        data = bytearray(self._byte_decoder[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


def _special_token_settings(folder: str, *, max_length_in_any_file: bool = False) -> tuple:
    """``(model_max_length, {"<role>_token": content}, normalized contents)`` from a tokenizer
    folder's tokenizer_config.json and special_tokens_map.json (both optional; read in this
    order, later definitions win). ``model_max_length`` (default 77) comes from
    tokenizer_config.json, or from either file with ``max_length_in_any_file``. A special token
    counts as normalized when every definition of its content is a dict with ``"normalized":
    true``."""
    defs: dict = {}  # role -> list of definitions (str or dict)
    max_len = 77
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        if name == "tokenizer_config.json" or max_length_in_any_file:
            m = cfg.get("model_max_length")
            if isinstance(m, (int, float)) and 0 < m < 1e6:
                max_len = int(m)
        for role in ("bos", "eos", "pad", "unk"):
            if cfg.get(f"{role}_token") is not None:
                defs.setdefault(role, []).append(cfg[f"{role}_token"])
    content = lambda d: d["content"] if isinstance(d, dict) else str(d)  # noqa: E731
    kwargs: dict[str, Any] = {}
    by_content: dict = {}
    for role, ds in defs.items():
        kwargs[f"{role}_token"] = content(ds[-1])
        by_content.setdefault(content(ds[-1]), []).extend(
            d for d in ds if content(d) == content(ds[-1]))
    normalized = [c for c, ds in by_content.items()
                  if all(isinstance(d, dict) and d.get("normalized", False) for d in ds)]
    return max_len, kwargs, normalized


def _alternation(tokens) -> Optional[Any]:
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


def _split(text: str, pattern) -> list:
    """[(piece, is_match)] covering ``text``; empty pieces dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], False))
        out.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


class WordTokenizer:
    """Word-level tokenizer for small closed vocabularies (embedded caption datasets).

    Text is lower-cased (``lowercase``) and split into words (``\\w+``) and single punctuation
    marks; words outside the list map to ``unk``. Ids: pad=0, unk=1, the words from 2 in the
    given order (duplicates dropped), then bos and eos last, so eos is the largest id and
    either CLIP pooling rule (argmax of ids, or first eos) finds it.
    Output format and truncation as :class:`CLIPTokenizer`.
    """
    _PAT = regex.compile(r"\w+|[^\w\s]")

    def __init__(self, words: Sequence[str], *, bos_token: str = "<bos>",
                 eos_token: str = "<eos>", pad_token: str = "<pad>", unk_token: str = "<unk>",
                 lowercase: bool = True, model_max_length: int = 77):
        self.lowercase = lowercase
        self.model_max_length = int(model_max_length)
        specials = [pad_token, unk_token, bos_token, eos_token]
        if len(set(specials)) != 4:
            raise ValueError(f"WordTokenizer: special tokens must be distinct, got {specials}")
        vocab = [pad_token, unk_token]
        seen = set(specials)
        for w in words:
            w = w.lower() if lowercase else w
            if not self._PAT.fullmatch(w):
                raise ValueError(f"WordTokenizer: {w!r} is not a single word or punctuation mark")
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab += [bos_token, eos_token]
        self.vocab = vocab
        self.encoder = {w: i for i, w in enumerate(vocab)}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token, eos_token, pad_token, unk_token)

    vocab_size = property(lambda self: len(self.vocab))
    bos_token_id = property(lambda self: self.encoder[self.bos_token])
    eos_token_id = property(lambda self: self.encoder[self.eos_token])
    pad_token_id = property(lambda self: self.encoder[self.pad_token])
    unk_token_id = property(lambda self: self.encoder[self.unk_token])

    def tokenize(self, text: str) -> list:
        return self._PAT.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list:
        """Word ids of ``text`` without bos/eos."""
        return [self.encoder.get(w, self.unk_token_id) for w in self.tokenize(text)]

    def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None,
                 padding: Union[bool, str] = "max_length", truncation: bool = True) -> dict:
        """Same contract as :meth:`CLIPTokenizer.__call__`."""
        max_length = self.model_max_length if max_length is None else int(max_length)
        seqs = [_frame(self.encode(t), self.bos_token_id, self.eos_token_id, max_length,
                       truncation) for t in _as_list(texts)]
        return _pad_batch(seqs, max_length, padding, self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        skip = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        return " ".join(self.vocab[i] for i in np.asarray(ids).reshape(-1).tolist()
                        if not (skip_special_tokens and i in skip))
