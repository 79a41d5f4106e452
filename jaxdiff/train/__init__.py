"""Functional training: TrainState, the pure train steps (diffusion; KL autoencoder in vae_step), Orbax checkpoints, and the host loop
(``jaxdiff.train.loop.train``, imported lazily since it pulls in data and sampling)."""
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
from jaxdiff.train.step import TrainState, create_train_state, ema_update, make_optimizer, make_train_step
from jaxdiff.train.vae_step import VAETrainState, create_vae_train_state, make_vae_train_step

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "TrainState",
    "VAETrainState",
    "create_vae_train_state",
    "create_train_state",
    "ema_update",
    "make_optimizer",
    "make_train_step",
    "make_vae_train_step",
]
