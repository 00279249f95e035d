"""Shared pieces of the absl entry points: typed configs, clean errors, workdirs."""

from __future__ import annotations

import fcntl
import logging as logging_std
import os
import pathlib
import sys
import time
from collections.abc import Callable

from absl import app, flags, logging

from mlx_sched.serve.request import RequestError
from mlx_sched.train.checkpoint import CheckpointError
from mlx_sched.train.data import DataError
from models.errors import ConfigError
from sharding.mesh import MeshError

__all__ = [
    "USER_ERRORS",
    "ConfigError",
    "CpuMeter",
    "WorkdirBusy",
    "config_path",
    "claim_workdir",
    "config_tag",
    "lock_workdir",
    "require_sections",
    "require_workdir",
    "run",
]


class WorkdirBusy(RuntimeError):
    """Another process holds the workdir's lock."""


# Errors that are the user's to fix: printed as one line, exit status 2.
USER_ERRORS = (ConfigError, DataError, MeshError, CheckpointError, RequestError, WorkdirBusy)

CONFIGS = pathlib.Path(__file__).parent / "configs"
LOCK_NAME = ".lock"
_held_locks: dict[pathlib.Path, int] = {}  # workdir -> fd, open for the process's lifetime


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


def config_tag(spec: str, home: str) -> str:
    """The variant of a `--config` value (`.../serve.py:online` -> `online`), prefixed by the
    file's name when it is not the entry point's `home` config (`x.py:online` -> `x_online`):
    output names that keep two variants' results apart in one workdir."""
    path, _, variant = spec.partition(":")
    stem = pathlib.Path(path).stem
    return (variant or "default") if stem == home else f"{stem}_{variant or 'default'}"


def require_sections(config, spec: str, sections: tuple[str, ...], why: str) -> None:
    """A ConfigError naming the sections an entry point needs that the --config lacks."""
    missing = [k for k in sections if k not in config]
    if missing:
        raise ConfigError(f"--config={spec} has no {' or '.join(missing)} section: {why}")


def require_workdir(value: str | None) -> pathlib.Path:
    if not value:
        raise ConfigError("--workdir is required: pass --workdir=/path/to/run (created if missing)")
    path = pathlib.Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={value} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--workdir={value} cannot be created ({e.strerror}); pass a folder you can write to"
        ) from e
    return path


def claim_workdir(value: str | None) -> pathlib.Path:
    """The workdir, created and locked for this run (by process 0 of a multi-process run: the
    others share the folder with it)."""
    path = require_workdir(value)
    if "process_id" not in flags.FLAGS or flags.FLAGS.process_id == 0:
        lock_workdir(path)
    return path


def lock_workdir(path: pathlib.Path) -> None:
    """Hold `<workdir>/.lock` (flock, holding our pid) until this process ends, so that a second
    run on the same workdir fails at once instead of interleaving with this one. The kernel
    releases the lock when the process dies, even by `kill -9`, so a killed run resumes."""
    path = pathlib.Path(path).absolute()
    if path in _held_locks:
        return
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"--workdir={path} is not writable ({e.strerror})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise WorkdirBusy(
            f"--workdir={path} is in use by process {other} (its {LOCK_NAME}); wait for it to "
            "finish, or pass another --workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[path] = fd


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
        # every program: a second start of the same configuration loads all of them
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
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
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a mistyped --config.x.y override or a missing config file as one
    clean line."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            _ = flags.FLAGS["config"].value.keys  # a config file that failed to load raises here
        return rest
    except OSError:
        print(f"error: {missing_config_message(argv)}", file=sys.stderr)
        sys.exit(2)
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


def missing_config_message(argv: list[str]) -> str:
    """One line naming the --config file that does not exist, and the ones that do."""
    spec = ""
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            spec = a.split("=", 1)[1]
        elif a in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
    path = spec.partition(":")[0]
    known = ", ".join(
        sorted(p.name for p in CONFIGS.glob("*.py") if "def get_config" in p.read_text())
    )
    return (
        f"--config={spec}: config file '{path}' does not exist; configs in "
        f"{CONFIGS.relative_to(CONFIGS.parent.parent)}/: {known}"
    )


class CpuMeter:
    """CPU seconds this process and every other one used while it was open (Linux
    /proc/stat): a measurement taken while other work ran is slower than the fit expects."""

    def __enter__(self):
        self._start = self._read()
        return self

    def __exit__(self, *exc):
        busy, own, wall = (b - a for a, b in zip(self._start, self._read(), strict=True))
        self.wall_s = wall
        self.other_cores = max(0.0, busy - own) / max(wall, 1e-9)

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = 0.0
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()
