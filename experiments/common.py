"""Shared pieces of the absl entry points: typed configs, clean errors, workdirs."""

from __future__ import annotations

import logging as logging_std
import pathlib
import sys
from collections.abc import Callable

from absl import app, flags, logging

from mlx_sched.train.checkpoint import CheckpointError
from mlx_sched.train.data import DataError
from models.errors import ConfigError

__all__ = ["USER_ERRORS", "ConfigError", "config_path", "require_workdir", "run"]
from sharding.mesh import MeshError

# Errors that are the user's to fix: printed as one line, exit status 2.
USER_ERRORS = (ConfigError, DataError, MeshError, CheckpointError)

CONFIGS = pathlib.Path(__file__).parent / "configs"


def config_path(name: str, variant: str | None = None) -> str:
    """Absolute path of a config file in experiments/configs, so any CWD works."""
    path = str(CONFIGS / f"{name}.py")
    return f"{path}:{variant}" if variant else path


def define_distributed_flags():
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs)")
    flags.DEFINE_integer("num_processes", 1, "number of JAX processes")
    flags.DEFINE_integer("process_id", 0, "this process's index")


def init_distributed():
    import sharding

    f = flags.FLAGS
    if f.num_processes > 1 or f.coordinator:
        sharding.initialize(f.coordinator, f.num_processes, f.process_id)


def require_workdir(value: str | None) -> pathlib.Path:
    if not value:
        raise ConfigError("--workdir is required: pass --workdir=/path/to/run (created if missing)")
    path = pathlib.Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={value} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


class _QuietLibraries(logging_std.Filter):
    """Drop INFO chatter from orbax and JAX internals; keep their warnings."""

    NOISY = ("/orbax/", "/jax/_src/", "/tensorstore/")

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or not any(
            n in record.pathname for n in self.NOISY
        )


def tune_process() -> None:
    """Process settings every entry point wants: a persistent XLA compilation cache
    (MLX_SCHED_JAX_CACHE, default ~/.cache/mlx_sched/jax; "0" turns it off) and a malloc
    that keeps freed memory for reuse (XLA:CPU allocates a fresh buffer per op result;
    returning large ones to the OS and faulting them in again costs more than the op)."""
    import ctypes
    import os

    import jax

    cache = os.environ.get("MLX_SCHED_JAX_CACHE", "~/.cache/mlx_sched/jax")
    if cache != "0":
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest value glibc accepts
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 256 << 20)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass  # not glibc: keep the defaults


def run(main: Callable[[list[str]], None]) -> None:
    """absl app.run, with known user errors printed as one clean line (exit status 2)."""

    def wrapped(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        tune_process()
        try:
            main(argv)
        except USER_ERRORS as e:
            logging.flush()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a mistyped --config.x.y override as one clean line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        # config-file errors carry a whole traceback: keep the flag and the final error
        msg = lines[0] if len(lines) < 3 else f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).encode().decode("unicode_escape")
        msg = " ".join(text.replace("'", " ").replace('"', "'").split())
        print(f"error: bad --config override: unknown key {msg}", file=sys.stderr)
        sys.exit(2)
