"""Functional training: TrainState, the pure train step, Orbax checkpoints, and the host loop
(``jaxdiff.train.loop.train``, imported lazily since it pulls in data and sampling)."""
from jaxdiff.train.checkpoint import Checkpointer, CheckpointError
from jaxdiff.train.step import TrainState, create_train_state, ema_update, make_optimizer, make_train_step

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "TrainState",
    "create_train_state",
    "ema_update",
    "make_optimizer",
    "make_train_step",
]
