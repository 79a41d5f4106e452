"""CLIP text encoder (transformers' ``CLIPTextModel``) as a Flax Linen module.

    enc = CLIPTextTransformer(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                              num_layers=12, num_heads=12)          # SD 1.x (ViT-L/14 text tower)
    last, pooled = enc.apply({"params": params}, input_ids, attention_mask)

Pre-LN causal transformer: h = tok_emb[ids] + pos_emb[0..L-1]; per block
h += out_proj(attn(LN1(h))) (causal, plus an optional key padding mask); h += fc2(act(fc1(LN2(h))));
last = final_LN(h); pooled = last at the end-of-text token.

Precision: parameters float32; the residual stream, LayerNorms and the attention softmax are
float32; the projections, attention matmuls and MLP compute in ``dtype`` (e.g. bfloat16).
Outputs are float32. Parameter names mirror transformers (``token_embedding``, ``layers_{i}``
with ``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``, ``mlp.fc1/fc2``,
``final_layer_norm``) so conversion (:mod:`jaxdiff.interop.clip`) is a renaming + transpose.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _layer_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """float32 LayerNorm (two-pass variance, as torch). Call inside a compact method."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)(x.astype(jnp.float32))


class CLIPAttention(nn.Module):
    """Multi-head self-attention. x: [B, L, D]; mask: [B, 1, 1|L, L] bool (True = may attend)
    or None; causal always. Returns [B, L, D] in ``dtype``."""
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        b, l, d = x.shape
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                      name=name)
        x = x.astype(self.dtype)
        q, k, v = (dense(n)(x).reshape(b, l, self.num_heads, d // self.num_heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        # jaxdiff.nn.layers.dot_product_attention takes no mask, so call jax directly.
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                         implementation=self.implementation)
        return dense("out_proj")(o.reshape(b, l, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. x: [B, L, D] -> [B, L, D] in ``dtype``."""
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="fc1")(x.astype(self.dtype))
        h = ACTIVATIONS[self.hidden_act](h)
        return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: h + attn(LN1(h)), then + mlp(LN2(h)). h: [B, L, D] float32 -> same."""
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, h: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        a = CLIPAttention(self.num_heads, self.dtype, self.implementation, name="self_attn")(
            _layer_norm(h, self.layer_norm_eps, "layer_norm1"), mask)
        h = h + a.astype(jnp.float32)
        m = CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
            _layer_norm(h, self.layer_norm_eps, "layer_norm2"))
        return h + m.astype(jnp.float32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class CLIPTextTransformer(nn.Module):
    """CLIP text transformer; defaults are transformers' ``CLIPTextConfig`` defaults.

    ``eos_token_id`` selects the pooled position as transformers does: when it is 2 (configs
    saved before transformers PR #24773) the position of the largest id in each row
    (``argmax(input_ids)``, first on ties), else the first position equal to ``eos_token_id``
    (position 0 when a row has none).
    ``implementation`` is passed to ``jax.nn.dot_product_attention`` ('cudnn' on GPU).
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32
    implementation: Optional[str] = None

    def _check(self, input_ids, attention_mask, clip_skip):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"CLIPTextTransformer: hidden_size={self.hidden_size} is not "
                             f"divisible by num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextTransformer: unsupported hidden_act={self.hidden_act!r} "
                             f"(supported: {sorted(ACTIVATIONS)})")
        if np.ndim(input_ids) != 2:
            raise ValueError("CLIPTextTransformer: input_ids must be [batch, seq_len], got shape "
                             f"{np.shape(input_ids)}")
        if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
            raise ValueError(f"CLIPTextTransformer: input_ids must be integers, got dtype "
                             f"{jnp.result_type(input_ids)}")
        seq = np.shape(input_ids)[1]
        if seq > self.max_position_embeddings:
            raise ValueError(f"CLIPTextTransformer: sequence length {seq} exceeds "
                             f"max_position_embeddings={self.max_position_embeddings}; "
                             "tokenize with max_length <= max_position_embeddings")
        if seq < 1:
            raise ValueError("CLIPTextTransformer: empty sequence (seq_len 0)")
        if _is_concrete(input_ids) and np.size(input_ids):
            ids = np.asarray(input_ids)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"CLIPTextTransformer: token ids must lie in [0, "
                                 f"{self.vocab_size}), got min {lo}, max {hi}")
        if attention_mask is not None and np.shape(attention_mask) != np.shape(input_ids):
            raise ValueError(f"CLIPTextTransformer: attention_mask shape "
                             f"{np.shape(attention_mask)} differs from input_ids shape "
                             f"{np.shape(input_ids)}")
        if not 0 <= clip_skip <= self.num_layers:
            raise ValueError(f"CLIPTextTransformer: clip_skip={clip_skip} must lie in "
                             f"[0, num_layers={self.num_layers}]")

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
                 clip_skip: int = 0, output_hidden_states: bool = False):
        """input_ids: [B, L] int (L <= max_position_embeddings); attention_mask: [B, L] (1 =
        token, 0 = padding; masks keys only, as transformers) or None.

        Returns ``(last_hidden_state [B, L, D], pooled [B, D])`` float32, plus, with
        ``output_hidden_states``, a tuple of num_layers + 1 un-normalised hidden states
        [B, L, D] (embeddings, then each block; transformers' ``hidden_states``).

        ``clip_skip=k`` returns ``final_layer_norm(hidden_states[-(k + 1)])`` as
        last_hidden_state (diffusers' ``clip_skip``; k=1 is the penultimate layer used by
        SD 2.x when the checkpoint still has all layers). ``pooled`` always comes from the full
        depth (transformers' ``pooler_output``).

        Padding positions of rows that see no unmasked key (left padding) are not meaningful.
        Ids out of range raise when concrete; under jit they are not checked.
        """
        self._check(input_ids, attention_mask, clip_skip)
        input_ids = jnp.asarray(input_ids)
        b, seq = input_ids.shape
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(self.vocab_size, self.hidden_size, param_dtype=jnp.float32,
                       embedding_init=init, name="token_embedding")(input_ids)
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, param_dtype=jnp.float32,
                       embedding_init=init, name="position_embedding")(jnp.arange(seq))
        h = tok.astype(jnp.float32) + pos[None].astype(jnp.float32)

        mask = None
        if attention_mask is not None:
            mask = (jnp.asarray(attention_mask) != 0)[:, None, None, :]  # [B, 1, 1, L] keys

        hidden = [h]
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, self.dtype, self.implementation,
                                 name=f"layers_{i}")(h, mask)
            hidden.append(h)

        final_ln = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                                param_dtype=jnp.float32, use_fast_variance=False,
                                name="final_layer_norm")
        last = final_ln(h)
        if self.eos_token_id == 2:  # legacy configs: eot is the largest id in each row
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(b), idx]
        if clip_skip:
            last = final_ln(hidden[-(clip_skip + 1)])
        if output_hidden_states:
            return last, pooled, tuple(hidden)
        return last, pooled
