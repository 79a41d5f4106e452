"""Latent text-to-image on the embedded captioned ``shapes`` data: a CLIP-style text transformer
trained from scratch together with a cross-attention U-Net on the 8x8x4 latents of ``vae_shapes``.

    python -m experiments.train --config=experiments/configs/vae_shapes.py --workdir=runs/vae_shapes
    python -m experiments.train --config=experiments/configs/t2i_shapes.py --workdir=runs/t2i_shapes
    python -m experiments.sample --workdir=runs/t2i_shapes --prompt "a red circle at the top left" --guidance=3
    python -m experiments.eval_t2i --workdir=runs/t2i_shapes      # prompt adherence at guidance 1 / 3 / 7
    # compositional generalisation: 21 combinations never seen in training, scored apart
    python -m experiments.train --config=experiments/configs/t2i_shapes.py --workdir=runs/t2i_shapes_holdout \
        --config.data.holdout=compositional
    python -m experiments.eval_t2i --workdir=runs/t2i_shapes_holdout

Captions are tokenized with a word-level tokenizer over the dataset's vocabulary
(:func:`jaxdiff.data.shapes.vocabulary`, stored in the config and so in every checkpoint) and
dropped to ``""`` with probability ``diffusion.p_uncond`` for classifier-free guidance.
Set ``vae.workdir=""`` to train the same model on pixels instead.
"""
import ml_collections

from experiments.configs import ldm_digits
from jaxdiff.data import shapes


def get_config():
    c = ldm_digits.get_config()  # seed, diffusion (cosine, v-prediction), train and sample settings
    c.task = "text"  # text encoder + cross-attention U-Net (on latents while vae.workdir is set)
    c.data.name = "shapes"
    c.data.image_size = 32
    c.data.conditional = True  # batches carry the captions (and attribute ids)
    # "compositional": train without 21 (shape, colour, position) triples (every pair of attributes
    # still seen; jaxdiff.data.shapes.holdout_labels); eval_t2i then scores them apart. "": all 189.
    c.data.holdout = ""
    c.vae.workdir = "runs/vae_shapes"

    c.model = ml_collections.ConfigDict()  # jaxdiff.nn.UNetCondition on 8x8x4 latents: levels 8, 4, 2
    c.model.type = "text_unet"
    c.model.block_out_channels = (32, 64, 64)
    c.model.layers_per_block = 1
    c.model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    c.model.mid_block_type = "UNetMidBlock2DCrossAttn"
    c.model.attention_head_dim = 2  # number of heads (diffusers' naming): 16- and 32-wide heads
    c.model.transformer_layers_per_block = 1
    c.model.use_linear_projection = True
    c.model.norm_num_groups = 8
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.remat = False

    c.text = ml_collections.ConfigDict()  # jaxdiff.nn.text.CLIPTextTransformer, trained from scratch
    c.text.words = shapes.vocabulary()
    c.text.max_length = 16  # bos + up to 14 words + eos; the longest caption has 11 tokens
    c.text.hidden_size = 64  # = the U-Net's cross_attention_dim
    c.text.intermediate_size = 128
    c.text.num_layers = 2
    c.text.num_heads = 4

    c.diffusion.p_uncond = 0.1  # caption dropout for classifier-free guidance

    c.train.num_steps = 2500
    c.train.lr = 1.5e-3
    c.train.batch_size = 64
    c.train.checkpoint_every = 500
    c.train.num_samples = 36
    c.train.eval_every = 500  # prompt adherence (colour, position, shape read from the pixels) as eval/...
    c.train.eval_num = 189  # every (shape, colour, position) prompt once

    c.sample.guidance = 3.0
    c.sample.prompts = [shapes.caption(s, col, p) for s, col, p in
                        [(0, 0, 0), (1, 2, 4), (2, 3, 8), (0, 4, 1), (1, 5, 3), (2, 6, 5)]]
    return c
