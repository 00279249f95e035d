"""Checkpoints: params, optimizer state, step and data position, via orbax CheckpointManager.

Orbax writes each step into a temporary folder and renames it when complete,
so a killed save never becomes "latest". Step folders that lack orbax's
completion metadata (copied by hand, or written by a non-atomic file system
and cut short) are moved aside to `<step>.incomplete` at start-up. A complete
checkpoint whose files cannot be read is moved aside to `<step>.corrupt` by
`restore_latest`, which then resumes from the newest earlier one. Restore
targets carry the *current* mesh's shardings, so a checkpoint saved on one
mesh shape restores onto another.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

COMPLETE_MARKER = "_CHECKPOINT_METADATA"
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message says what to do."""


class CorruptCheckpoint(CheckpointError):
    """A complete checkpoint's files cannot be read."""


class _DropOrphanedReads(logging.Filter):
    def filter(self, record):
        return "exception was never retrieved" not in record.getMessage()


def _is_orphaned_read(e: BaseException | None, tb) -> bool:
    """A read's completion reported into the closed event loop of a failed restore."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return isinstance(e, RuntimeError) and "call_soon_threadsafe" in frames


def _quiet_orphaned_reads() -> None:
    """Silence the reads a failed restore leaves behind. Orbax reads the arrays concurrently on
    an event loop that it closes as soon as one read fails; the others finish later on
    tensorstore's threads and report "Event loop is closed" (as unraisable exceptions) or
    "exception was never retrieved" (asyncio's log), hundreds of lines after the one error
    that matters. Installed once, on the first failed restore; other errors still print."""
    if getattr(sys.unraisablehook, "drops_orphaned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_orphaned_read(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropOrphanedReads())


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
            _quiet_orphaned_reads()
            raise CorruptCheckpoint(
                f"checkpoint {self.directory / str(step)} is unreadable ({_short(e)}); delete that "
                "folder to resume from the previous checkpoint, or use a fresh --workdir"
            ) from e
        return out["params"], out.get("opt_state"), dict(out["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            _quiet_orphaned_reads()
            raise CorruptCheckpoint(
                f"checkpoint {self.directory / str(step)} has unreadable metadata ({_short(e)})"
            ) from e
        return dict(out["meta"])

    def restore_latest(
        self,
        params_like,
        opt_state_like=None,
        check: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        """(step, params, opt_state, meta) of the newest checkpoint that reads, or None if there
        is no checkpoint. `check(step, meta)` may refuse one (raising CheckpointError: e.g. a
        different model), which stops the search. Unreadable checkpoints newer than the one
        restored are moved aside to `<step>.corrupt`, with a warning naming each."""
        corrupt: list[tuple[int, CorruptCheckpoint]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
                if check is not None:
                    check(step, meta)
                params, opt_state, meta = self.restore(step, params_like, opt_state_like)
            except CorruptCheckpoint as e:
                corrupt.append((step, e))
                continue
            for bad, e in corrupt:
                self._set_aside(bad, _short(e.__cause__ or e), step)
            return step, params, opt_state, meta
        if corrupt:
            steps = [s for s, _ in corrupt]
            raise CorruptCheckpoint(
                f"no checkpoint in {self.directory} is readable (steps {steps}; step {steps[0]}: "
                f"{_short(corrupt[0][1].__cause__ or corrupt[0][1])}); use a fresh --workdir, or "
                "delete that folder to train from step 0"
            )
        return None

    def _set_aside(self, step: int, why: str, resumed: int) -> None:
        source = self.directory / str(step)
        target = source.with_name(f"{step}.corrupt")
        logging.warning(
            "checkpoint step %d is unreadable (%s); moved aside to %s; resuming from step %d",
            step,
            why,
            target,
            resumed,
        )
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        self.manager.reload()

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
