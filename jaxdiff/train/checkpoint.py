"""Orbax checkpoints of the train state, with metadata, for automatic resume.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. Saves are atomic (Orbax writes to a
temporary directory and renames), so a run killed mid-save leaves the previous checkpoint intact.
Restoring takes an abstract target whose leaves carry the *current* shardings, so a checkpoint
written on N devices restores onto M devices.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with ``shardings`` when given) describing ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager``.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: keep the newest N checkpoints.
      async_save: write in a background thread (call :meth:`wait` before reading them back).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"No checkpoints in {self.directory}. Train first (python -m experiments.train --workdir=...) "
                "or point --workdir at a run directory that has a 'checkpoints' folder."
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able dict) as checkpoint ``step``."""
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # disk full, permissions, ...: the previous checkpoint is untouched
            prev = self.latest_step()
            raise CheckpointError(
                f"Writing the checkpoint of step {step} to {self.directory} failed ({type(e).__name__}: {e}). "
                f"The previous checkpoint ({'step ' + str(prev) if prev is not None else 'none'}) is intact; "
                "free disk space or fix permissions and re-run the same command to resume."
            ) from e

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"A background checkpoint write to {self.directory} failed ({type(e).__name__}: {e}). "
                "Earlier checkpoints are intact; free disk space or fix permissions and re-run to resume."
            ) from e

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` at ``step`` (latest by default) into the structure, dtypes and
        shardings of ``target`` (arrays or ``jax.ShapeDtypeStruct``s)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            target,
        )
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise CheckpointError(
                f"Could not restore checkpoint {step} from {self.directory} ({type(e).__name__}: {e}). "
                "If the model config changed since it was written, use the original config or a new --workdir."
            ) from e
        return out.state, dict(out.meta)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore_subtree(self, step: int, name: str, target: Any) -> Any:
        """Only ``state[name]`` (e.g. ``"ema_params"``) of checkpoint ``step``, into the structure,
        dtypes and shardings of ``target`` (``jax.ShapeDtypeStruct`` leaves); the rest of the state
        (optimizer moments, ...) is never read."""
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={name: target},
                    restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), {name: target}),
                    partial_restore=True,
                )
            ),
        )
        return restored.state[name]

    def set_aside(self, step: int) -> str:
        """Move checkpoint ``step`` (unreadable) out of the way, to ``WORKDIR/checkpoints.corrupt/<step>``:
        kept for inspection, never deleted, and no longer found by resume. Process 0 moves it; every
        process then sees the remaining checkpoints. Returns the new path."""
        from jaxdiff import parallel

        src = os.path.join(self.directory, str(int(step)))
        dst = os.path.join(self.directory + ".corrupt", str(int(step)))
        if os.path.exists(dst):
            dst = f"{dst}.{int(time.time())}"
        if parallel.is_writer():
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
        parallel.sync(f"jaxdiff_set_aside_{int(step)}")
        self._manager.reload()
        return dst

    def close(self) -> None:
        self._manager.close()
