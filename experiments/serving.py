"""Shared serving pieces of the entry points: build a model and an engine from a config,
replay a workload, write metrics and plots."""

from __future__ import annotations

import logging
import pathlib

import jax
from flax import nnx

import sharding
from mlx_sched.lab import plots as serving_plots
from mlx_sched.lab import workload
from mlx_sched.lab.replay import replay
from mlx_sched.serve import metrics
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.engine import Engine
from mlx_sched.train.checkpoint import CheckpointError, open_existing
from models import ModelConfig, Transformer
from models.errors import ConfigError


def load_model(config) -> Transformer:
    """Random init from config.model, or weights from config.checkpoint / config.hf_path."""
    if config.get("hf_path"):
        from models import hf

        return hf.load_model(config.hf_path, dtype=config.model.get("dtype", "float32"))
    if config.get("checkpoint"):
        path = pathlib.Path(config.checkpoint)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        ckpt, step = open_existing(path)
        meta = ckpt.read_meta(step)
        if "model" not in meta:
            raise CheckpointError(f"checkpoint {path}/{step} has no model config in its metadata")
        cfg = ModelConfig.from_dict(meta["model"])
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        graphdef, like = nnx.split(abstract, nnx.Param)
        params, _, _ = ckpt.restore(step, like)
        ckpt.close()
        logging.info("loaded %s step %d", path, step)
        return nnx.merge(graphdef, params)
    cfg = ModelConfig.from_dict(config.model)
    return Transformer(cfg, nnx.Rngs(0))


def make_engine(model, config, **overrides) -> Engine:
    serve = ServeConfig.from_dict({**config.serve.to_dict(), **overrides})
    mesh_cfg = config.get("mesh", {})
    mesh = sharding.make_mesh(mesh_cfg) if mesh_cfg else None
    return Engine(model, serve, mesh=mesh)


def engine_and_trace(config):
    """Engine and trace for a serving experiment: `config.device` is "real" or "sim"."""
    if config.get("device", "real") == "sim":
        from mlx_sched.lab.simulator import SimClock, SimModel, SimRunner

        mc = ModelConfig.from_dict(config.model)
        serve = ServeConfig.from_dict(config.serve.to_dict())
        clock = SimClock()
        model = SimModel(mc)
        cost = StepTimeModel(**config.get("sim_cost", {}))
        engine = Engine(model, serve, runner=SimRunner(mc, serve, clock, cost), clock=clock)
    else:
        model = load_model(config)
        engine = make_engine(model, config)
    return engine, make_trace(model, config)


def make_trace(model, config, corpus=None) -> list[workload.TraceRequest]:
    w = config.workload
    max_total = min(model.cfg.max_seq_len, config.serve.get("max_context") or model.cfg.max_seq_len)
    if w.get("clients"):
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
    wall = replay(engine, trace, online=w.online, time_scale=w.time_scale)
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
