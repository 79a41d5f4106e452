"""U-Net training-step and sampling-step throughput: jaxdiff vs diffusers' UNet2DModel (PyTorch).

    python -m benchmarks.unet_bench --small                      # 2-core CPU: 1.1M params, batch 4
    python -m benchmarks.unet_bench                              # GPU: DDPM CIFAR-10, batch 128
    python -m benchmarks.unet_bench --small --batch 4,16 --precision fp32,bf16 --remat \\
        --max-batch --mem-budget 2GiB --json out.json
    python -m benchmarks.unet_bench --model cond --small         # CPU: SD-like 2.2M, 16x16x4, b4
    python -m benchmarks.unet_bench --model cond --precision bf16  # GPU: SD 1.5 U-Net, batch 8

``--model cond`` benchmarks the latent text-to-image U-Net instead: jaxdiff's
``jaxdiff.nn.unet_cond.UNetCondition`` against diffusers' ``UNet2DConditionModel``, both built
from one diffusers config (``benchmarks.unet_configs.COND_SMALL`` / ``SD15``), on random
latents and a random text context [B, 77, cross_attention_dim] (the same tensor every step),
with SD's scaled-linear schedule; everything else below applies unchanged, except that there is
no analytic FLOP count (XLA's count only). On a GPU both frameworks hold an SD-sized train
state (4 x 3.4 GB fp32) in one process, so for ``--model cond`` the CLI turns off JAX's
preallocation of 75% of the GPU (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, unless set).

One run measures, for each batch size and precision:
  train   jaxdiff: the real ``jaxdiff.train.step.make_train_step`` (AdamW + clip + EMA +
          non-finite guard), jitted with the state donated; diffusers: the same network as
          ``UNet2DModel``, MSE on a random timestep and noise, ``backward``, clip_grad_norm_,
          ``AdamW.step`` (foreach), ``zero_grad`` and an EMA ``_foreach_lerp_`` -- the work our
          step does; also ``torch.compile`` when it works, and jaxdiff with ``remat=True``.
  sample  one model forward at eval (the cost of one sampling step), and for jaxdiff
          ``jaxdiff.sampling.sample(method="ddim")`` over N steps, to show the loop overhead
          (time of N steps vs N x one forward).
The jaxdiff programs compile with what jaxdiff's own jits use (``jaxdiff.xla.compiler_options``:
on the CPU, jaxlib's YNNPACK library fusions off), then any ``--xla-option`` on top (these
reach the train step and the forward, not the DDIM loop, which compiles inside
``jaxdiff.sampling``); ``--jaxlib-defaults`` also times both without jaxdiff's options,
interleaved with the default rows.
Times are medians over ``--steps`` calls after compilation and warm-up (``block_until_ready``;
torch on CPU is synchronous, on CUDA we synchronise). FLOPs come from XLA's
``compiled.cost_analysis()``; the torch row of the same config uses the same count. Peak memory:
jaxdiff = XLA's ``memory_analysis()`` (arguments + outputs - aliased + temporaries; what the
program needs, by XLA's buffer assignment); diffusers = ``torch.cuda.max_memory_allocated`` on
GPU, and on CPU the resident tensors (params, and for training EMA + AdamW state) plus the peak
of the allocations made during one call, from the profiler's memory events (RSS is useless here:
malloc caches freed memory and JAX shares the process).

The machine, the interleaved timing, XLA's FLOP and memory figures and the table come from
``benchmarks.harness``; this module holds the U-Net runners (jaxdiff, diffusers), the max-batch
search, the rows and the CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np

from benchmarks.harness import (bench_params, device_memory, fmt_bytes, fmt_load, interleave,
                                largest_batch, load_average, machine_info, markdown_table,
                                matmul_peak, median_ms, parse_bytes, parse_xla_options, try_call,
                                write_json, xla_flops, xla_memory)
from benchmarks.unet_configs import (COND_SMALL, DDPM_CIFAR10, SD15, SMALL, diffusers_config,
                                     unet_forward_flops)

PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass
class BenchConfig:
    unet: dict
    image_size: int = 32
    channels: int = 3
    batches: tuple[int, ...] = (128,)
    precisions: tuple[str, ...] = ("fp32",)
    steps: int = 10  # timed calls per measurement (median reported)
    warmup: int = 2
    sampling_steps: int = 10
    sampling_repeats: int = 3
    blocks: int = 3  # interleaved blocks per measurement
    pause: float = 0.5  # seconds of idle before each timed block
    torch: bool = True
    torch_compile: bool = True
    remat: bool = False
    jaxlib_defaults: bool = False  # also time jaxdiff compiled without jaxdiff.xla's options
    max_batch: bool = False
    mem_budget: int | None = None  # bytes; default: device memory (GPU) or MemAvailable (CPU)
    compiler_options: dict = dataclasses.field(default_factory=dict)
    matmul_peak: bool = True
    name: str = "custom"
    # "uncond": jaxdiff.nn.UNet vs UNet2DModel, ``unet`` = UNet kwargs. "cond": UNetCondition vs
    # UNet2DConditionModel, ``unet`` = UNet2DConditionModel kwargs (see unet_configs.SD15);
    # image_size / channels are then the latent's, the context is [B, context_len, D].
    model: str = "uncond"
    context_len: int = 77


# ----------------------------------------------------------------------------- jaxdiff side
def jaxdiff_options(cfg: BenchConfig) -> dict:
    """What jaxdiff's own jits compile with (``jaxdiff.xla``), then ``--xla-option`` on top."""
    from jaxdiff import xla
    return {**xla.compiler_options(), **cfg.compiler_options}


class _Jax:
    """The jaxdiff programs of one (config, precision, remat), built once, timed on demand."""

    def __init__(self, cfg: BenchConfig, precision: str, remat: bool = False):
        import jax
        import jax.numpy as jnp

        from jaxdiff.nn import UNet
        from jaxdiff.models import DiffusionModel
        from jaxdiff.schedules import make_schedule

        self.cfg, self.precision, self.remat = cfg, precision, remat
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
        self.module = UNet(**cfg.unet, dtype=dtype, remat=remat)
        self.model = DiffusionModel(self.module, (cfg.image_size, cfg.image_size, cfg.channels))
        self.schedule = make_schedule("linear", 1000)
        self.params = bench_params(jax.eval_shape(self.model.init_params, jax.random.key(0)))
        self.n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    @property
    def options(self) -> dict:
        return jaxdiff_options(self.cfg)

    def _image(self, batch, seed=1):
        import jax
        shape = (batch, self.cfg.image_size, self.cfg.image_size, self.cfg.channels)
        return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)

    # What differs between the models: the conditioning, and how the network is called.
    def _cond(self, batch: int) -> dict:
        """Conditioning inputs of a batch (in the train batch, and the forward's arguments)."""
        return {}

    def _train_apply_fn(self):
        return self.model.train_apply_fn()

    def _apply(self, params, x, t, cond):
        return self.model.apply(params, x, t)

    def _sampler_fn(self, cond):
        """(model_fn, extra_args) for ``jaxdiff.sampling.sample``."""
        return self.model.uncond_model_fn, {"params": self.params}

    def compile_train(self, batch: int, compiler_options: dict | None = None):
        """``compiler_options``: default ``self.options``; ``{}`` = XLA_FLAGS / jaxlib defaults."""
        import jax

        from jaxdiff.train.step import create_train_state, make_optimizer, make_train_step

        opt = make_optimizer(learning_rate=2e-4)
        state = create_train_state(jax.tree.map(lambda a: a.copy(), self.params), opt)
        step = make_train_step(self._train_apply_fn(), opt, self.schedule, seed=0)
        data = {"image": self._image(batch), **self._cond(batch)}
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=0).lower(state, data)
        t1 = time.perf_counter()
        opts = self.options if compiler_options is None else compiler_options
        compiled = lowered.compile(opts or None)
        t2 = time.perf_counter()
        return compiled, state, data, t1 - t0, t2 - t1

    def train(self, batch: int, compiler_options: dict | None = None) -> dict:
        """Compile the train step; returns a warmed-up ``run`` (one step, synchronised) and
        the compile facts."""
        import jax

        compiled, state, data, t_lower, t_compile = self.compile_train(batch, compiler_options)
        box = [state]

        def run():
            box[0], metrics = compiled(box[0], data)
            jax.block_until_ready((box[0], metrics))

        for _ in range(self.cfg.warmup):
            run()
        return dict(run=run, flops=xla_flops(compiled), mem=xla_memory(compiled),
                    lower_s=t_lower, compile_s=t_compile)

    def forward(self, batch: int, compiler_options: dict | None = None) -> dict:
        """One eval forward (a sampling step's model call), compiled and warmed up."""
        import jax
        import jax.numpy as jnp

        x = self._image(batch, 2)
        t = jnp.full((batch,), 500.0, jnp.float32)
        cond = self._cond(batch)
        fn = jax.jit(self._apply)
        t0 = time.perf_counter()
        lowered = fn.lower(self.params, x, t, cond)
        t1 = time.perf_counter()
        opts = self.options if compiler_options is None else compiler_options
        compiled = lowered.compile(opts or None)
        t2 = time.perf_counter()

        def run():
            jax.block_until_ready(compiled(self.params, x, t, cond))

        for _ in range(self.cfg.warmup):
            run()
        return dict(run=run, flops=xla_flops(compiled), mem=xla_memory(compiled),
                    lower_s=t1 - t0, compile_s=t2 - t1)

    def ddim(self, batch: int, num_steps: int) -> dict:
        """``jaxdiff.sampling.sample(method="ddim")`` over ``num_steps`` steps, compiled (first
        call) and ready to time."""
        import jax

        from jaxdiff import sampling

        x_T = jax.random.normal(jax.random.key(3), self._image(batch).shape)
        model_fn, extra_args = self._sampler_fn(self._cond(batch))

        def run():
            jax.block_until_ready(sampling.sample(
                model_fn, self.schedule, x_T, method="ddim", num_steps=num_steps,
                extra_args=extra_args))

        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run()
        return dict(run=run, first_call_s=first, second_call_s=time.perf_counter() - t0)


class _JaxCond(_Jax):
    """The same programs for ``jaxdiff.nn.unet_cond.UNetCondition`` on latents and a text
    context; the train step is still the real ``make_train_step``, its apply_fn takes the
    context from the batch."""

    def __init__(self, cfg: BenchConfig, precision: str, remat: bool = False):
        import jax
        import jax.numpy as jnp

        from jaxdiff.interop import unet2d_condition_config_from_diffusers
        from jaxdiff.nn.unet_cond import UNetCondition
        from jaxdiff.schedules import make_schedule

        self.cfg, self.precision, self.remat = cfg, precision, remat
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
        kwargs = unet2d_condition_config_from_diffusers(cfg.unet)
        self.module = UNetCondition(**kwargs, dtype=dtype, remat=remat)
        self.context_dim = kwargs["cross_attention_dim"]
        self.schedule = make_schedule("scaled_linear", 1000)
        x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
        ctx = jnp.zeros((1, cfg.context_len, self.context_dim), jnp.float32)
        shapes = jax.eval_shape(self.module.init, jax.random.key(0), x, jnp.zeros((1,)), ctx)
        self.params = bench_params(shapes["params"])
        self.n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))
        module = self.module

        def model_fn(x_t, t, *, params, context):  # defined once: the sampler's jit cache key
            return module.apply({"params": params}, x_t, t, context)

        self._model_fn = model_fn

    def _cond(self, batch: int) -> dict:
        import jax
        shape = (batch, self.cfg.context_len, self.context_dim)
        return {"context": jax.random.normal(jax.random.key(4), shape)}

    def _train_apply_fn(self):
        module = self.module

        def apply_fn(params, x_t, t, batch, key):
            return module.apply({"params": params}, x_t, t, batch["context"], train=True,
                                rngs={"dropout": key})

        return apply_fn

    def _apply(self, params, x, t, cond):
        return self.module.apply({"params": params}, x, t, cond["context"])

    def _sampler_fn(self, cond):
        return self._model_fn, {"params": self.params, "context": cond["context"]}


def _jax_cls(cfg: BenchConfig):
    return {"uncond": _Jax, "cond": _JaxCond}[cfg.model]


def max_batch_search(cfg: BenchConfig, precision: str, remat: bool, budget: int,
                     start: int, max_probes: int = 8, tolerance: float = 0.02) -> dict:
    """Largest batch whose jaxdiff train step fits ``budget`` bytes by XLA's memory_analysis
    (``harness.largest_batch``'s search from ``start``). The probes compile with LLVM's expensive
    passes off and backend optimisation 0: buffer assignment, hence memory_analysis, is decided
    before LLVM runs."""
    j = _jax_cls(cfg)(cfg, precision, remat)
    fast = {**jaxdiff_options(cfg), "xla_llvm_disable_expensive_passes": True,
            "xla_backend_optimization_level": 0}
    found = largest_batch(lambda b: xla_memory(j.compile_train(b, fast)[0]), budget, start,
                          max_probes, tolerance)
    return dict(precision=precision, remat=remat, budget=budget, **found)


# ----------------------------------------------------------------------------- diffusers side
class _Torch:
    schedule = "linear"  # betas of jaxdiff.schedules.make_schedule(schedule, 1000)

    def __init__(self, cfg: BenchConfig):
        import torch

        from jaxdiff.schedules import betas_np

        self.torch = torch
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        self.model = self._build()
        self.model.to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.params = list(self.model.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0, foreach=True)
        betas = betas_np(self.schedule, 1000)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32,
                                           device=self.device)
        self._compiled = None

    def _build(self):
        from diffusers import UNet2DModel
        c = self.cfg
        return UNet2DModel(**diffusers_config(c.unet, c.image_size, c.channels))

    def _cond(self, batch: int) -> dict:
        """Keyword arguments of the network call besides (x_t, t)."""
        return {}

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _autocast(self, precision):
        import contextlib
        if precision == "bf16":
            return self.torch.autocast(self.device, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _net(self, compiled: bool):
        if not compiled:
            return self.model
        if self._compiled is None:
            self._compiled = self.torch.compile(self.model)
        return self._compiled

    def _state_bytes(self) -> int:
        """Bytes of params, EMA and optimiser state (what jaxdiff's state holds)."""
        ts = list(self.params) + list(self.ema)
        for st in self.opt.state.values():
            ts += [v for v in st.values() if self.torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in ts)

    def _prepare(self, run, warmup: int, train: bool) -> dict:
        """Warm ``run`` up; returns it (wrapped to track CUDA peak memory) and its peak memory.

        CUDA: ``max_memory_allocated`` over the timed calls. CPU: the resident tensors (params;
        for a train step also EMA and AdamW state) plus the peak of the allocations made during
        one extra step, replayed from the profiler's memory events (``profile_memory=True``:
        the allocator's own bookkeeping, so neither malloc's caching nor JAX's memory in the
        same process blurs it)."""
        torch = self.torch
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            run()
        first = time.perf_counter() - t0
        if self.device == "cuda":
            box = {"peak": 0}
            torch.cuda.reset_peak_memory_stats()

            def tracked():
                run()
                box["peak"] = torch.cuda.max_memory_allocated()

            return dict(run=tracked, warmup_s=first, mem=lambda: box["peak"],
                        mem_kind="cuda max_memory_allocated")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        live = peak = 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            if ev.self_cpu_memory_usage:
                live += ev.self_cpu_memory_usage
                peak = max(peak, live)
        resident = (self._state_bytes() if train
                    else sum(p.numel() * p.element_size() for p in self.params))
        return dict(run=run, warmup_s=first, mem=lambda: resident + peak,
                    mem_kind="state + allocation peak")

    def train(self, batch: int, precision: str, compiled: bool = False) -> dict:
        torch = self.torch
        c, s = self.cfg.channels, self.cfg.image_size
        x0 = torch.rand(batch, c, s, s, device=self.device) * 2 - 1
        cond = self._cond(batch)
        self.model.train()
        net = self._net(compiled)

        def run():
            t = torch.randint(0, 1000, (batch,), device=self.device)
            eps = torch.randn_like(x0)
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            with self._autocast(precision):
                pred = net(x_t, t, **cond).sample
            loss = torch.nn.functional.mse_loss(pred.float(), eps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.9999)
            self._sync()

        return self._prepare(run, self.cfg.warmup, train=True)

    def forward(self, batch: int, precision: str, compiled: bool = False) -> dict:
        torch = self.torch
        c, s = self.cfg.channels, self.cfg.image_size
        x = torch.rand(batch, c, s, s, device=self.device) * 2 - 1
        t = torch.full((batch,), 500, device=self.device, dtype=torch.long)
        cond = self._cond(batch)
        net = self._net(compiled)

        def run():
            self.model.eval()
            with torch.inference_mode(), self._autocast(precision):
                net(x, t, **cond)
            self._sync()
            self.model.train()

        return self._prepare(run, self.cfg.warmup, train=False)


class _TorchCond(_Torch):
    """diffusers ``UNet2DConditionModel`` of the same config, called with
    ``encoder_hidden_states`` = a random text context [B, context_len, cross_attention_dim]."""
    schedule = "scaled_linear"

    def _build(self):
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(**self.cfg.unet)

    def _cond(self, batch: int) -> dict:
        d = self.model.config.cross_attention_dim
        ctx = self.torch.randn(batch, self.cfg.context_len, d, device=self.device)
        return {"encoder_hidden_states": ctx}


def _torch_cls(cfg: BenchConfig):
    return {"uncond": _Torch, "cond": _TorchCond}[cfg.model]


# ----------------------------------------------------------------------------- the run
def _row(task, impl, variant, batch, times=None, flops=None, mem=None, mem_kind="", note="",
         compile_s=None, per=1):
    row = dict(task=task, impl=impl, variant=variant, batch=batch, ms=None, ms_min=None,
               images_per_s=None, tflops=None, flops=flops, mem_bytes=mem, mem_kind=mem_kind,
               compile_s=compile_s, note=note, speed_vs_diffusers=None)
    if times:
        ms, ms_min = median_ms(times)
        row.update(ms=ms / per, ms_min=ms_min / per)
        row["images_per_s"] = batch / (row["ms"] / 1e3)
        if flops:
            row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
    return row


JAXLIB_DEFAULTS = "jaxlib defaults"


def _options_note(options: dict) -> str:
    """The XLA options a jaxdiff row was compiled with, for its note column."""
    if not options:
        return "XLA options: none (XLA_FLAGS / jaxlib defaults)"
    return "XLA options: " + ", ".join(f"{k}={v!r}" for k, v in options.items())


def _measure_pair(cfg, log, label, jax_prep, torch_preps, jax_extra=None):
    """Interleave the timed calls of one jaxdiff program (and its ``jax_extra`` variants) and
    its torch counterparts."""
    runs = {"jaxdiff": jax_prep["run"]}
    runs.update({k: v["run"] for k, v in (jax_extra or {}).items()})
    runs.update({k: v["run"] for k, v in torch_preps.items() if v is not None})
    log(f"# timing {label}: {', '.join(runs)} ({cfg.steps} calls each, interleaved)")
    return interleave(runs, cfg.steps, blocks=min(cfg.blocks, cfg.steps), pause=cfg.pause)


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    import jax

    info = machine_info()
    log(f"# machine: {info['cpu']} ({info['cpu_cores']} cores, {info['cpu_isa']}), "
        f"jax {info['jax']} on {info['jax_backend']} [{info['device_kind']}], "
        f"torch {info.get('torch')} on {info.get('torch_device')} "
        f"({info.get('torch_threads')} threads), diffusers {info.get('diffusers')}")
    rows, compiles, notes = [], [], []
    result = dict(machine=info, config=dict(dataclasses.asdict(cfg)), rows=rows,
                  compile=compiles, notes=notes)
    gpu = jax.default_backend() == "gpu"
    torch_side = None
    if cfg.torch:
        try:
            torch_side = _torch_cls(cfg)(cfg)
        except ImportError as e:
            notes.append(f"torch/diffusers unavailable: {e}")
    if cfg.model == "uncond":
        result["model"] = "jaxdiff.nn.UNet vs diffusers UNet2DModel"
        result["analytic_forward_flops"] = {
            b: unet_forward_flops(cfg.unet, b, cfg.image_size, cfg.channels)["total"]
            for b in cfg.batches}
    else:
        from jaxdiff.interop import unet2d_condition_config_from_diffusers
        d = unet2d_condition_config_from_diffusers(cfg.unet)["cross_attention_dim"]
        result["model"] = (
            f"jaxdiff.nn.unet_cond.UNetCondition vs diffusers UNet2DConditionModel; latents "
            f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.channels}], text context "
            f"[B, {cfg.context_len}, {d}]")

    for precision in cfg.precisions:
        j = _jax_cls(cfg)(cfg, precision)
        result.setdefault("params", {})["jaxdiff"] = j.n_params
        result["jaxdiff_xla_options"] = j.options
        log("# jaxdiff rows: " + _options_note(j.options))
        if torch_side is not None:
            result["params"]["diffusers"] = torch_side.n_params
            log(f"# parameters: jaxdiff {j.n_params:,}  diffusers {torch_side.n_params:,}")
            if j.n_params != torch_side.n_params:
                raise RuntimeError(f"parameter counts differ: jaxdiff {j.n_params:,} vs "
                                   f"diffusers {torch_side.n_params:,}")
        else:
            log(f"# parameters: jaxdiff {j.n_params:,}")
        for b in cfg.batches:
            # ---- train step
            log(f"# {precision} batch {b}: compiling the jaxdiff train step ...")
            jt = j.train(b)
            compiles.append(dict(program=f"train step {precision} b{b}", lower_s=jt["lower_s"],
                                 compile_s=jt["compile_s"]))
            tps, errs = {}, {}
            if torch_side is not None:
                tps[precision + " eager"] = torch_side.train(b, precision)
                if cfg.torch_compile:
                    log(f"# {precision} batch {b}: torch.compile of the diffusers train step ...")
                    key = precision + " torch.compile"
                    tps[key], errs[key] = try_call(torch_side.train, b, precision, compiled=True)
            extra = {}
            if cfg.jaxlib_defaults:
                log(f"# {precision} batch {b}: compiling the jaxdiff train step, jaxlib defaults ...")
                extra[JAXLIB_DEFAULTS] = j.train(b, compiler_options=dict(cfg.compiler_options))
            ts = _measure_pair(cfg, log, f"train {precision} b{b}", jt, tps, extra)
            rows.append(_row("train", "jaxdiff", precision, b, ts["jaxdiff"], jt["flops"],
                             jt["mem"], "XLA estimate", compile_s=jt["compile_s"]))
            for name, prep in extra.items():
                rows.append(_row("train", "jaxdiff", f"{precision} {name}", b, ts[name],
                                 prep["flops"], prep["mem"], "XLA estimate",
                                 compile_s=prep["compile_s"], note=_options_note(cfg.compiler_options)))
            if cfg.remat:
                log(f"# {precision} batch {b}: compiling the jaxdiff train step, remat ...")
                jr = _jax_cls(cfg)(cfg, precision, remat=True).train(b)
                compiles.append(dict(program=f"train step {precision} remat b{b}",
                                     lower_s=jr["lower_s"], compile_s=jr["compile_s"]))
                tr = interleave({"remat": jr["run"]}, cfg.steps, 1, cfg.pause)["remat"]
                rows.append(_row("train", "jaxdiff", precision + " remat", b, tr, jr["flops"],
                                 jr["mem"], "XLA estimate", compile_s=jr["compile_s"],
                                 note="FLOPs incl. recompute"))
            for name in [precision + " eager", precision + " torch.compile"]:
                if name in tps and tps[name] is not None:
                    rows.append(_row("train", "diffusers", name, b, ts[name], jt["flops"],
                                     tps[name]["mem"](), tps[name]["mem_kind"],
                                     note=("" if "eager" in name else
                                           f"warm-up incl. compile {tps[name]['warmup_s']:.0f} s")))
                elif name in errs:
                    rows.append(_row("train", "diffusers", name, b, note=errs[name]))

            # ---- one sampling step = one eval forward; and the DDIM loop
            log(f"# {precision} batch {b}: compiling the jaxdiff forward ...")
            jf = j.forward(b)
            compiles.append(dict(program=f"forward {precision} b{b}", lower_s=jf["lower_s"],
                                 compile_s=jf["compile_s"]))
            fps, ferrs = {}, {}
            if torch_side is not None:
                fps[precision + " eager forward"] = torch_side.forward(b, precision)
                if cfg.torch_compile and tps.get(precision + " torch.compile") is not None:
                    key = precision + " torch.compile forward"
                    fps[key], ferrs[key] = try_call(torch_side.forward, b, precision, compiled=True)
            n = cfg.sampling_steps
            runs = {"jaxdiff": jf["run"]}
            fextra = {}
            if cfg.jaxlib_defaults:
                fextra[JAXLIB_DEFAULTS] = j.forward(b, compiler_options=dict(cfg.compiler_options))
                runs[JAXLIB_DEFAULTS] = fextra[JAXLIB_DEFAULTS]["run"]
            if n:
                log(f"# {precision} batch {b}: compiling jaxdiff DDIM x {n} ...")
                dd = j.ddim(b, n)
                compiles.append(dict(program=f"ddim x{n} {precision} b{b} (first - second call)",
                                     lower_s=None,
                                     compile_s=dd["first_call_s"] - dd["second_call_s"]))
                runs["ddim"] = dd["run"]
            runs.update({k: v["run"] for k, v in fps.items() if v is not None})
            log(f"# timing forward {precision} b{b}: {', '.join(runs)} (interleaved)")
            blocks = max(min(cfg.blocks, cfg.steps), cfg.sampling_repeats if n else 0)
            fs = interleave(runs, cfg.steps, blocks=blocks, pause=cfg.pause, calls={"ddim": 1})
            rows.append(_row("sample", "jaxdiff", precision + " forward", b, fs["jaxdiff"],
                             jf["flops"], jf["mem"], "XLA estimate", compile_s=jf["compile_s"]))
            for name, prep in fextra.items():
                rows.append(_row("sample", "jaxdiff", f"{precision} forward {name}", b, fs[name],
                                 prep["flops"], prep["mem"], "XLA estimate",
                                 compile_s=prep["compile_s"], note=_options_note(cfg.compiler_options)))
            if n:
                overhead = median_ms(fs["ddim"])[0] / (n * median_ms(fs["jaxdiff"])[0]) - 1.0
                rows.append(_row("sample", "jaxdiff", f"{precision} ddim x{n}, per step", b,
                                 fs["ddim"], jf["flops"], per=n,
                                 note=f"{overhead:+.1%} vs {n} x forward"))
            for name in [precision + " eager forward", precision + " torch.compile forward"]:
                if fps.get(name) is not None:
                    rows.append(_row("sample", "diffusers", name, b, fs[name], jf["flops"],
                                     fps[name]["mem"](), fps[name]["mem_kind"]))
                elif name in ferrs:
                    rows.append(_row("sample", "diffusers", name, b, note=ferrs[name]))
        del j

    # Speed relative to diffusers eager of the same task, batch and precision.
    for r in rows:
        prec = r["variant"].split()[0]
        ref = [q for q in rows if q["impl"] == "diffusers" and q["task"] == r["task"]
               and q["batch"] == r["batch"] and q["variant"].startswith(prec + " eager")]
        if ref and ref[0]["ms"] and r["ms"]:
            r["speed_vs_diffusers"] = ref[0]["ms"] / r["ms"]

    if cfg.matmul_peak:
        dt, n = ("bf16", 8192) if gpu else ("fp32", 2048)
        peak = matmul_peak(dt, n)
        result["matmul_peak"] = dict(dtype=dt, n=n, tflops=peak / 1e12)
        for r in rows:
            if r["tflops"]:
                r["fraction_of_matmul_peak"] = r["tflops"] * 1e12 / peak

    if cfg.max_batch:
        budget = cfg.mem_budget or device_memory()
        start = min(cfg.batches)
        mb = []
        for precision in cfg.precisions:
            for remat in (False, True):
                log(f"# max batch: {precision} remat={remat} within {fmt_bytes(budget)} ...")
                mb.append(max_batch_search(cfg, precision, remat, budget, start))
        result["max_batch"] = mb
    info["loadavg_end"] = load_average()
    return result


# ----------------------------------------------------------------------------- output
_MEM_TAGS = {"XLA estimate": "xla", "state + allocation peak": "torch",
             "cuda max_memory_allocated": "cuda"}


def format_table(result: dict) -> str:
    info = result["machine"]
    lines = [
        f"machine: {info['cpu']}, {info['cpu_cores']} cores ({info['cpu_isa']}); "
        f"jax {info['jax']} / jaxlib {info['jaxlib']} on {info['jax_backend']} "
        f"[{info['device_kind']}]; torch {info.get('torch')} on {info.get('torch_device')} "
        f"({info.get('torch_threads')} threads); diffusers {info.get('diffusers')}; "
        f"{info['date']}; load average {fmt_load(info.get('loadavg_start'))} -> "
        f"{fmt_load(info.get('loadavg_end'))}",
    ]
    if info.get("XLA_FLAGS"):
        lines.append(f"XLA_FLAGS={info['XLA_FLAGS']}")
    if result.get("model"):
        lines.append(f"model: {result['model']} (config {result['config'].get('name')})")
    if "jaxdiff_xla_options" in result:
        lines.append("jaxdiff rows: " + _options_note(result["jaxdiff_xla_options"]))
    p = result.get("params", {})
    lines.append("parameters: " + ", ".join(f"{k} {v:,}" for k, v in p.items()))
    head = ("task", "impl", "variant", "batch", "ms/step", "min ms", "img/s", "TFLOP/s",
            "peak mem", "vs diffusers", "note")
    table = [head]
    for r in result["rows"]:
        mem = fmt_bytes(r["mem_bytes"]) if r["mem_bytes"] is not None else "n/a"
        if r["mem_bytes"] is not None and r["mem_kind"]:
            mem += " (" + _MEM_TAGS.get(r["mem_kind"], r["mem_kind"]) + ")"
        table.append((
            r["task"], r["impl"], r["variant"], str(r["batch"]),
            "n/a" if r["ms"] is None else f"{r['ms']:.1f}",
            "n/a" if r["ms_min"] is None else f"{r['ms_min']:.1f}",
            "n/a" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
            "n/a" if r["tflops"] is None else f"{r['tflops']:.4f}",
            mem,
            "" if r["speed_vs_diffusers"] is None else f"{r['speed_vs_diffusers']:.2f}x",
            r["note"] or "",
        ))
    lines.extend(markdown_table(table))
    lines.append("vs diffusers = diffusers eager ms / this row's ms (same task, batch, precision);"
                 " >1: faster than diffusers eager. FLOPs: XLA cost_analysis of the jaxdiff "
                 "program, used for the torch rows too. Memory: xla = XLA memory_analysis "
                 "(arguments + outputs - aliased + temporaries); torch = resident tensors (params, "
                 "+ EMA and AdamW state for train) + peak of the allocations during one call "
                 "(profiler memory events); cuda = max_memory_allocated.")
    if "matmul_peak" in result:
        mp = result["matmul_peak"]
        lines.append(f"{mp['dtype']} matmul peak ({mp['n']}^2 jnp.dot): {mp['tflops']:.4f} TFLOP/s")
        for r in result["rows"]:
            if r["task"] == "train" and r["impl"] == "jaxdiff" and r.get("fraction_of_matmul_peak"):
                lines.append(f"  train step {r['variant']} b{r['batch']}: "
                             f"{r['fraction_of_matmul_peak']:.1%} of it")
    lines.append("compile (jaxdiff): " + "; ".join(
        f"{c['program']}: " + ("" if c["lower_s"] is None else f"trace+lower {c['lower_s']:.1f} s, ")
        + f"compile {c['compile_s']:.1f} s" for c in result["compile"]))
    for mb in result.get("max_batch", []):
        lines.append(f"max batch {mb['precision']}{' remat' if mb['remat'] else ''} within "
                     f"{fmt_bytes(mb['budget'])}: {mb['max_batch']} "
                     f"({fmt_bytes(mb['bytes_per_example'])}/example + "
                     f"{fmt_bytes(mb['fixed_bytes'])} fixed, XLA memory_analysis)")
    lines.extend(result.get("notes", []))
    return "\n".join(lines)


def config_from_args(argv=None) -> BenchConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("uncond", "cond"), default="uncond",
                    help="uncond: jaxdiff.nn.UNet vs UNet2DModel (pixels); cond: the latent "
                         "text-to-image jaxdiff.nn.unet_cond.UNetCondition vs "
                         "UNet2DConditionModel with a [B, 77, D] text context")
    ap.add_argument("--small", action="store_true",
                    help="for a CPU, batch 4: uncond: 1.1M-parameter U-Net (ch 32, ch_mult 1,2,2, "
                         "1 res block, attention at 8x8); cond: SD-like 2.2M (16x16x4 latents, "
                         "channels 32,64,64, context dim 64). Default: DDPM CIFAR-10 (35.7M), "
                         "batch 128; cond: the SD 1.5 U-Net (859.5M, 64x64x4), batch 8.")
    ap.add_argument("--batch", help="comma-separated batch sizes")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=3,
                    help="interleave jaxdiff and torch calls in this many alternating blocks")
    ap.add_argument("--torch-threads", type=int,
                    help="torch.set_num_threads (default: torch's, = cores)")
    ap.add_argument("--sampling-steps", type=int, default=10,
                    help="N of the DDIM loop measurement (0: skip)")
    ap.add_argument("--remat", action="store_true", help="also time jaxdiff with remat=True")
    ap.add_argument("--jaxlib-defaults", action="store_true",
                    help="also time jaxdiff compiled without jaxdiff.xla's options (jaxlib's "
                         "defaults, or XLA_FLAGS), interleaved with the default rows")
    ap.add_argument("--max-batch", action="store_true",
                    help="find the largest train batch that fits (plain and remat)")
    ap.add_argument("--mem-budget", type=parse_bytes,
                    help="memory budget for --max-batch, e.g. 2GiB (default: device memory)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--no-matmul-peak", action="store_true")
    ap.add_argument("--xla-option", action="append", metavar="KEY=VALUE",
                    help="per-compile XLA option for the jaxdiff programs "
                         "(e.g. xla_llvm_disable_expensive_passes=true); repeatable")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    for p in a.precision.split(","):
        if p not in PRECISIONS:
            ap.error(f"--precision: {p!r} is not one of {PRECISIONS}")
    if a.model == "cond":
        unet, name, default_batch = (COND_SMALL, "cond_small", 4) if a.small else (SD15, "sd15", 8)
        shape = dict(image_size=unet["sample_size"], channels=unet["in_channels"])
    else:
        unet, name, default_batch = ((SMALL, "small", 4) if a.small
                                     else (DDPM_CIFAR10, "ddpm_cifar10", 128))
        shape = {}
    batches = tuple(int(b) for b in a.batch.split(",")) if a.batch else (default_batch,)
    cfg = BenchConfig(
        unet=dict(unet), batches=batches, **shape,
        precisions=tuple(a.precision.split(",")), steps=a.steps, warmup=a.warmup,
        sampling_steps=a.sampling_steps, torch=not a.no_torch, blocks=a.blocks,
        torch_compile=not a.no_torch_compile, remat=a.remat, jaxlib_defaults=a.jaxlib_defaults, max_batch=a.max_batch,
        mem_budget=a.mem_budget, compiler_options=parse_xla_options(a.xla_option),
        matmul_peak=not a.no_matmul_peak, name=name, model=a.model)
    cfg.json = a.json  # type: ignore[attr-defined]
    if a.torch_threads:
        import torch
        torch.set_num_threads(a.torch_threads)
    return cfg


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    from jaxdiff import parallel

    parallel.initialize_distributed()  # before anything touches the backend (no-op on one host)
    if cfg.model == "cond" and cfg.torch:
        # Two SD-sized train states in one process: JAX must not take 75% of the GPU up front.
        # (Read when JAX starts its backend, i.e. at the first jax call below; no effect on CPU.)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    out = getattr(cfg, "json", None)
    if out:
        write_json(out, result)
    return result


if __name__ == "__main__":
    main()
