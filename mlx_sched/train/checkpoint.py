"""Checkpoints: params, optimizer state, step and data position, via orbax CheckpointManager.

Orbax writes each step into a temporary folder and renames it when complete,
so a killed save never becomes "latest". Step folders that lack orbax's
completion metadata (copied by hand, or written by a non-atomic file system
and cut short) are moved aside to `<step>.incomplete` at start-up. Restore
targets carry the *current* mesh's shardings, so a checkpoint saved on one
mesh shape restores onto another.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

COMPLETE_MARKER = "_CHECKPOINT_METADATA"
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message says what to do."""


def _abstract(tree):
    """ShapeDtypeStructs (with shardings where present) to restore into."""

    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._quarantine_incomplete()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def _quarantine_incomplete(self) -> None:
        if jax.process_index() != 0:
            return
        for d in self.directory.iterdir():
            if d.is_dir() and d.name.isdigit() and not (d / COMPLETE_MARKER).exists():
                target = d.with_name(d.name + ".incomplete")
                logging.warning("checkpoint %s is incomplete; moved aside to %s", d, target)
                d.rename(target)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params_like, opt_state_like=None):
        """Restore (params, opt_state, meta) into the shapes/shardings of the `*_like` trees.

        With `opt_state_like=None` only params and meta are read (for serving).
        """
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
        items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        items["meta"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is unreadable ({_short(e)}); delete that "
                "folder to resume from the previous checkpoint, or use a fresh --workdir"
            ) from e
        return out["params"], out.get("opt_state"), dict(out["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has unreadable metadata ({_short(e)})"
            ) from e
        return dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def open_existing(directory: str | pathlib.Path) -> tuple[Checkpointer, int]:
    """A Checkpointer on a folder that must already hold a checkpoint, and its latest step."""
    path = pathlib.Path(directory).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder '{directory}' does not exist")
    ckpt = Checkpointer(path, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(
            f"'{directory}' holds no complete checkpoint; train first "
            "(python -m experiments.train --workdir=...) or point at a run's checkpoints/ folder"
        )
    return ckpt, step
