"""Shared serving pieces of the entry points: build a model and an engine from a config,
replay a workload, write metrics and plots."""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import ml_collections
from flax import nnx

import sharding
from mlx_sched.lab import plots as serving_plots
from mlx_sched.lab import workload
from mlx_sched.lab.replay import replay
from mlx_sched.serve import metrics
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError
from mlx_sched.train.loop import model_config
from mlx_sched.train.weights import load_checkpoint, load_weights  # noqa: F401 (re-exported)
from models import Transformer
from models.errors import ConfigError, check_keys


def load_model(config) -> Transformer:
    """Random init from config.model, or weights from config.checkpoint / config.hf_path."""
    if config.get("hf_path"):
        from models import hf

        return hf.load_model(config.hf_path, dtype=config.model.get("dtype", "float32"))
    if config.get("checkpoint"):
        return load_checkpoint(config.checkpoint)
    cfg = model_config(config.model)
    return Transformer(cfg, nnx.Rngs(0))


def load_text_model(config, checkpoint: str = "", hf_path: str = ""):
    """(model, tokenizer, name) for serving text: from a training run (`checkpoint`: its
    folder or checkpoints/), a Hugging Face folder (`hf_path`), or the config's (its own
    checkpoint / hf_path, else random weights, with a warning). The tokenizer is the
    folder's tokenizer.json, or the byte-level one of the framework's models; None when
    the model has neither (token-id prompts only)."""
    from mlx_sched.server import text

    checkpoint = checkpoint or config.get("checkpoint", "")
    hf_path = hf_path or ("" if checkpoint else config.get("hf_path", ""))
    if checkpoint and hf_path:
        raise ConfigError("give a checkpoint or an hf_path, not both")
    dtype = config.model.get("dtype", "float32")
    if hf_path:
        from models import hf

        model, source = hf.load_model(hf_path, dtype=dtype), hf_path
    elif checkpoint:
        model, source = load_checkpoint(checkpoint), checkpoint
    else:
        logging.warning("no --checkpoint or --hf_path: serving a randomly initialised model")
        model, source = Transformer(model_config(config.model), nnx.Rngs(0)), ""
    try:
        tokenizer = text.load_tokenizer(hf_path or None, model.cfg.vocab_size)
    except text.TextError as e:
        raise ConfigError(str(e)) from None
    if tokenizer is None:
        logging.warning("%s has no tokenizer.json: prompts must be token ids", hf_path)
    name = pathlib.Path(source).resolve().name if source else "random"
    if name == "checkpoints":
        name = pathlib.Path(source).resolve().parent.name
    return model, tokenizer, name


def serve_config(config, **overrides) -> ServeConfig:
    """The experiment's ServeConfig. Experiments analyse every request and step, so the engine
    keeps them all (history=-1) unless the config sets serve.history."""
    return ServeConfig.from_dict({"history": -1, **config.serve.to_dict(), **overrides})


def make_engine(model, config, **overrides) -> Engine:
    """The experiment's engine; with serve.speculative.kind='draft_model', the draft model is
    loaded from serve.speculative.draft_checkpoint in the target's dtype."""
    serve = serve_config(config, **overrides)
    mesh_cfg = config.get("mesh", {})
    mesh = sharding.make_mesh(mesh_cfg) if mesh_cfg else None
    draft = None
    if serve.spec is not None and serve.spec.kind == "draft_model":
        if not serve.spec.draft_checkpoint:
            raise ConfigError(
                "serve.speculative.kind='draft_model' needs serve.speculative.draft_checkpoint "
                "(a training run's checkpoints or a Hugging Face folder)"
            )
        draft = load_weights(serve.spec.draft_checkpoint, model.cfg.dtype)
    return Engine(model, serve, mesh=mesh, draft_model=draft)


def engine_and_trace(config):
    """Engine and trace for a serving experiment: `config.device` is "real" or "sim"."""
    if config.get("device", "real") == "sim":
        from mlx_sched.lab.simulator import SimClock, SimModel, SimRunner

        mc = model_config(config.model)
        serve = serve_config(config)
        clock = SimClock()
        model = SimModel(mc)
        cost = StepTimeModel(**config.get("sim_cost", {}))
        engine = Engine(model, serve, runner=SimRunner(mc, serve, clock, cost), clock=clock)
    else:
        model = load_model(config)
        engine = make_engine(model, config)
    return engine, make_trace(model, config)


# ---------------------------------------------------------------------------
# Offered load relative to the capacity measured here
# ---------------------------------------------------------------------------


def measure_capacity(config, per_slot: int = 8) -> float:
    """Requests per second the engine finishes when full, on this machine (or the simulated
    device): the experiment's own client mix, `per_slot` requests per slot, all queued at t=0,
    FCFS. An experiment that must overload the engine sets its rates from this figure rather
    than from one measured on another machine."""
    cal = ml_collections.ConfigDict(config.to_dict())
    cal.serve.policy, cal.serve.policy_args = "fcfs", {}
    cal.workload.online = False
    clients = [dict(c) for c in cal.workload.clients]
    n, total = per_slot * cal.serve.max_seqs, sum(c["rate"] for c in clients)
    cal.workload.clients = [
        {**c, "num_requests": max(1, round(n * c["rate"] / total))} for c in clients
    ]
    engine, trace = engine_and_trace(cal)
    wall = replay(engine, trace, online=False)
    return engine.summary(wall)["finished"] / wall


def capacity(config, cache: pathlib.Path) -> float:
    """`measure_capacity`, measured once per engine / model / request mix and kept in `cache`
    (a sweep's points share one figure, so they are offered the same load)."""
    c = config.to_dict()
    key = json.dumps(
        {
            "device": c.get("device", "real"),
            "model": c.get("model"),
            "weights": [c.get("checkpoint"), c.get("hf_path")],
            "sim_cost": c.get("sim_cost"),
            "serve": {k: v for k, v in c["serve"].items() if k not in ("policy", "policy_args")},
            "clients": [
                {k: v for k, v in cl.items() if k not in ("rate", "num_requests")}
                for cl in c["workload"]["clients"]
            ],
        },
        sort_keys=True,
        default=str,
    )
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        logging.info("measuring the engine's capacity for this request mix")
        known[key] = measure_capacity(config)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    logging.info("capacity %.3f req/s (%s)", known[key], cache)
    return known[key]


def at_offered_load(config, capacity_req_s: float):
    """A copy of `config` whose clients together offer `workload.offered_load` x the capacity:
    their rates keep their ratios, and their request counts keep the trace's duration."""
    w = config.workload
    if w.offered_load <= 0:
        raise ConfigError(f"workload.offered_load must be > 0, got {w.offered_load}")
    clients = [dict(c) for c in w.clients]
    total = sum(c["rate"] for c in clients)
    duration = max(c["num_requests"] / c["rate"] for c in clients)
    scale = w.offered_load * capacity_req_s / total
    out = ml_collections.ConfigDict(config.to_dict())
    out.workload.clients = [
        {
            **c,
            "rate": c["rate"] * scale,
            "num_requests": max(1, round(c["rate"] * scale * duration)),
        }
        for c in clients
    ]
    return out


def make_trace(model, config, corpus=None) -> list[workload.TraceRequest]:
    w = config.workload
    max_total = min(model.cfg.max_seq_len, config.serve.get("max_context") or model.cfg.max_seq_len)
    if w.get("clients"):
        for c in w.clients:
            check_keys(workload.ClientSpec, c, "workload.clients")
        specs = [workload.ClientSpec(**dict(c)) for c in w.clients]
        return workload.client_trace(
            specs, max_total, min(256, model.cfg.vocab_size), corpus, w.seed
        )
    if w.num_requests <= 0:
        raise ConfigError(f"workload.num_requests must be > 0, got {w.num_requests}")
    return workload.synthetic_trace(
        n=w.num_requests,
        rate=w.rate if w.online else None,
        preset=w.preset,
        max_total=min(
            model.cfg.max_seq_len, config.serve.get("max_context") or model.cfg.max_seq_len
        ),
        length_scale=w.length_scale,
        cv=w.cv,
        vocab=min(256, model.cfg.vocab_size),
        corpus=corpus,
        seed=w.seed,
    )


def run(engine: Engine, trace, config, workdir: pathlib.Path | None = None, tag: str = "") -> dict:
    """Replay the trace; returns the summary (and writes JSON + plots to workdir if given)."""
    w = config.workload
    try:
        wall = replay(engine, trace, online=w.online, time_scale=w.time_scale)
    except RequestError as e:
        raise RequestError(
            f"{e} (here serve.num_pages={engine.cfg.num_pages}; the trace's lengths come from "
            "the workload section: preset / length_scale, or each client's input_len / "
            "output_len)"
        ) from e
    summary = engine.summary(wall)
    summary["compiles_after_warmup"] = engine.runner.compiles_since_warmup
    summary["serve"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in vars(engine.cfg).items()
    }
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"serving{('_' + tag) if tag else ''}"
        metrics.write_json(workdir / f"{name}.json", summary)
        metrics.write_json(workdir / f"{name}_requests.json", engine.request_metrics())
        serving_plots.latency_cdfs(engine.request_metrics(), workdir / f"{name}_latency.png")
        serving_plots.timeline(engine.step_records, workdir / f"{name}_timeline.png")
    return summary


def devices_note() -> str:
    return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
