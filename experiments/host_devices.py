"""Simulated CPU devices for an entry point whose instances need devices of their own.

Import it and call `simulate(8)` before anything imports jax: XLA reads its flags once, when
the backend starts. A count the user already set in XLA_FLAGS is kept. This module imports
nothing but the standard library, so it is safe to import first.
"""

from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count"


def simulate(count: int = 8) -> None:
    """Ask XLA:CPU for `count` devices unless XLA_FLAGS already sets a device count."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG.lstrip("-") not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={count}".strip()
