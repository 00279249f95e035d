"""Synthetic workloads: arrival processes, length distributions, traces saved as JSONL.

Arrivals: Poisson (exponential gaps), Gamma with burstiness CV (shape 1/CV^2,
scale 1/(rate * shape)), and on/off per client. Lengths: log-normal fits to
the mean input/output lengths of public traces (reference/algorithms.md),
clipped to what the model's context allows. Everything is seeded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """Log-normal lengths with a given mean and shape sigma (heavy tail for larger sigma)."""

    mean: float
    sigma: float = 1.0
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.sigma == 0:
            return np.full(n, int(round(self.mean)), np.int64).clip(self.lo, self.hi)
        mu = math.log(self.mean) - self.sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2/2)
        return np.round(rng.lognormal(mu, self.sigma, n)).astype(np.int64).clip(self.lo, self.hi)


# (input, output) length models; means from reference/algorithms.md
PRESETS: dict[str, tuple[LengthDist, LengthDist]] = {
    "sharegpt": (LengthDist(250, 1.0), LengthDist(338, 1.0)),
    "summarization": (LengthDist(2588, 0.5), LengthDist(291, 0.6)),
    "code": (LengthDist(2048, 0.6), LengthDist(28, 0.8)),
    "azure_conv": (LengthDist(1155, 0.8), LengthDist(211, 0.9)),
    "alpaca": (LengthDist(19, 0.6), LengthDist(58, 0.8)),
    "fixed": (LengthDist(128, 0.0), LengthDist(128, 0.0)),
    "decode_heavy": (LengthDist(32, 0.0), LengthDist(256, 0.0)),
    "heavy_tail": (LengthDist(64, 0.5), LengthDist(96, 1.6)),  # output CV ~3.4: a few huge jobs
}


def scaled(preset: str, max_total: int, scale: float = 1.0) -> tuple[LengthDist, LengthDist]:
    """A preset with its means multiplied by `scale` and lengths clipped to fit `max_total`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown length preset '{preset}'; known: {sorted(PRESETS)}")
    din, dout = PRESETS[preset]
    cap_in = max(1, int(max_total * 0.75))
    din = dataclasses.replace(din, mean=max(1.0, din.mean * scale), lo=1, hi=cap_in)
    dout = dataclasses.replace(dout, mean=max(1.0, dout.mean * scale), lo=1, hi=max_total)
    return din, dout


def poisson_arrivals(rng: np.random.Generator, rate: float, n: int, start: float = 0.0):
    return start + np.cumsum(rng.exponential(1.0 / rate, n))


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, n: int, start: float = 0.0):
    """Gamma inter-arrival gaps with mean 1/rate and coefficient of variation cv."""
    shape = 1.0 / cv**2
    return start + np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), n))


def onoff_arrivals(rng, rate: float, n: int, on_s: float, off_s: float, start: float = 0.0):
    """Poisson arrivals at `rate` during on-periods of on_s seconds, silence for off_s."""
    out, t = [], start
    while len(out) < n:
        t_end = t + on_s
        while len(out) < n:
            t += rng.exponential(1.0 / rate)
            if t >= t_end:
                break
            out.append(t)
        t = t_end + off_s
    return np.asarray(out)


@dataclasses.dataclass
class TraceRequest:
    arrival: float
    prompt: list[int]
    max_tokens: int
    client: str = "default"
    priority: int = 0
    deadline: float | None = None


def make_prompts(rng: np.random.Generator, lengths: Sequence[int], vocab: int, corpus=None):
    """Prompts of given lengths: windows of a token corpus if given, else random ids."""
    out = []
    for n in lengths:
        if corpus is not None and len(corpus) > n + 1:
            s = int(rng.integers(0, len(corpus) - n - 1))
            out.append([int(t) for t in corpus[s : s + n]])
        else:
            out.append([int(t) for t in rng.integers(0, vocab, n)])
    return out


def synthetic_trace(
    n: int,
    rate: float | None,
    preset: str = "sharegpt",
    max_total: int = 1024,
    length_scale: float = 1.0,
    cv: float | None = None,
    vocab: int = 256,
    corpus=None,
    seed: int = 0,
    client: str = "default",
) -> list[TraceRequest]:
    """n requests; rate None means offline (all arrive at t=0); cv selects Gamma arrivals."""
    rng = np.random.default_rng(seed)
    din, dout = scaled(preset, max_total, length_scale)
    lin = din.sample(rng, n)
    lout = dout.sample(rng, n)
    lout = np.minimum(lout, max_total - lin).clip(1)
    if rate is None:
        arrivals = np.zeros(n)
    elif cv is None or cv == 1.0:
        arrivals = poisson_arrivals(rng, rate, n)
    else:
        arrivals = gamma_arrivals(rng, rate, cv, n)
    prompts = make_prompts(rng, lin, vocab, corpus)
    return [
        TraceRequest(float(a), p, int(o), client)
        for a, p, o in zip(arrivals, prompts, lout, strict=True)
    ]


def save_trace(trace: list[TraceRequest], path: str | pathlib.Path) -> None:
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def load_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip():
            out.append(TraceRequest(**json.loads(line)))
    return out


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """One client's request stream."""

    name: str
    rate: float  # requests / s (during on-periods for on/off streams)
    num_requests: int
    preset: str = "sharegpt"
    length_scale: float = 1.0
    input_len: int = 0  # > 0: fixed input length instead of the preset
    output_len: int = 0  # > 0: fixed output length
    cv: float = 1.0  # inter-arrival burstiness (1: Poisson)
    on_s: float = 0.0  # > 0: on/off stream with these on and off periods
    off_s: float = 0.0
    start: float = 0.0
    priority: int = 0
    ttft_deadline: float = 0.0  # > 0: each request's TTFT deadline, seconds after arrival

    def __post_init__(self):
        if self.rate <= 0 or self.num_requests < 1:
            raise ConfigError(
                f"workload.clients '{self.name}': rate must be > 0 and num_requests > 0, got "
                f"rate={self.rate}, num_requests={self.num_requests}"
            )


def client_trace(
    specs: Sequence[ClientSpec], max_total: int, vocab: int = 256, corpus=None, seed: int = 0
) -> list[TraceRequest]:
    """Merged, time-ordered requests of several clients, each with its own stream."""
    out: list[TraceRequest] = []
    for k, spec in enumerate(specs):
        rng = np.random.default_rng([seed, k])
        n = spec.num_requests
        if spec.on_s > 0:
            arrivals = onoff_arrivals(rng, spec.rate, n, spec.on_s, spec.off_s, spec.start)
        elif spec.cv == 1.0:
            arrivals = poisson_arrivals(rng, spec.rate, n, spec.start)
        else:
            arrivals = gamma_arrivals(rng, spec.rate, spec.cv, n, spec.start)
        din, dout = scaled(spec.preset, max_total, spec.length_scale)
        lin = np.full(n, spec.input_len) if spec.input_len else din.sample(rng, n)
        lout = np.full(n, spec.output_len) if spec.output_len else dout.sample(rng, n)
        lin = np.minimum(lin, max_total - 1)
        lout = np.minimum(lout, max_total - lin).clip(1)
        for a, p, o in zip(arrivals, make_prompts(rng, lin, vocab, corpus), lout, strict=True):
            deadline = a + spec.ttft_deadline if spec.ttft_deadline > 0 else None
            out.append(TraceRequest(float(a), p, int(o), spec.name, spec.priority, deadline))
    out.sort(key=lambda r: r.arrival)
    return out
