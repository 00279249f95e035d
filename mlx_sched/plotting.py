"""matplotlib with the headless Agg backend: the one `plt` every package's plots draw with."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
