"""Sharded language-model training: AdamW step, eval, metrics, checkpoints, resume.

`Trainer(...).run()` is the whole loop. The jitted step is pure (`steps.py`):
`(params, opt_state, batch, step) -> (params, opt_state, metrics)`, with its
shardings and donation declared once where it is wrapped, here.

With `model.lora` set, `params` are the adapter's (`models.lora.LoraParam`) and
the base weights are a frozen extra argument of the step: no gradient, no
optimizer state, never written, not in the checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from mlx_sched.train import data as data_lib
from mlx_sched.train.checkpoint import Checkpointer, CheckpointError
from mlx_sched.train.optim import TrainConfig, lr_at, make_optimizer
from mlx_sched.train.steps import eval_step, train_step
from mlx_sched.train.weights import with_base
from models.config import ConfigError, ModelConfig, check_keys
from models.lora import LoraParam
from models.moe import check_mesh
from models.transformer import Transformer

# ---------------------------------------------------------------------------
# Config-time checks
# ---------------------------------------------------------------------------


def check_fits(model_cfg: ModelConfig, tc: TrainConfig, mesh_shape: dict[str, int]) -> None:
    """Training batches and the model's heads must fit the mesh (checked before any compile):
    the sharding rules would otherwise fail on an indivisible batch, or silently replicate
    heads the tensor axis cannot split."""
    if tc.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len must be <= model.max_seq_len={model_cfg.max_seq_len}, got {tc.seq_len}"
        )
    rows = [a for a in ("data", "fsdp", "expert") if mesh_shape.get(a, 1) > 1]
    split = int(np.prod([mesh_shape[a] for a in rows]))
    if tc.batch_size % split:
        axes = " x ".join(f"mesh.{a}={mesh_shape[a]}" for a in rows)
        raise ConfigError(
            f"train.batch_size must be a multiple of {split} (the batch is split over {axes}), "
            f"got {tc.batch_size}"
        )
    t = mesh_shape.get("tensor", 1)
    heads = {"model.n_heads": model_cfg.n_heads, "model.n_kv_heads": model_cfg.n_kv_heads}
    if any(n % t for n in heads.values()):
        g = int(np.gcd(*heads.values()))
        ok = [d for d in range(1, g + 1) if g % d == 0]
        names = " and ".join(f"{k}={v}" for k, v in heads.items())
        raise ConfigError(f"mesh.tensor must divide {names} (one of {ok}), got {t}")


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------


class Trainer:
    """Builds mesh-placed state and jitted steps; `run()` trains, evaluates, checkpoints.

    With `model_cfg.lora` set only the adapter trains; `base` (the nnx.Param state of the
    model without adapter, e.g. `nnx.state(hf.load_llama(path), nnx.Param)`) is the frozen
    base, by default the one `train.seed` initialises.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        mesh: jax.sharding.Mesh,
        workdir: str | pathlib.Path,
        data_path: str | None = None,
        heldout_fraction: float = 0.02,
        corpus: data_lib.Corpus | None = None,
        base: nnx.State | None = None,
    ):
        self.model_cfg, self.tc, self.mesh = model_cfg, train_cfg, mesh
        check_fits(model_cfg, train_cfg, dict(mesh.shape))
        check_mesh(model_cfg, dict(mesh.shape), train_cfg.batch_size, train_cfg.seq_len)
        self.workdir = pathlib.Path(workdir).absolute()
        self.primary = jax.process_index() == 0
        if self.primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.corpus = corpus or data_lib.load_corpus(data_path, heldout_fraction)
        if model_cfg.vocab_size < data_lib.VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size={model_cfg.vocab_size} is smaller than the byte tokenizer's "
                f"{data_lib.VOCAB_SIZE}"
            )
        self.batcher = data_lib.Batcher(
            self.corpus.train,
            train_cfg.batch_size,
            train_cfg.seq_len,
            train_cfg.seed,
            jax.process_index(),
            jax.process_count(),
        )
        self.eval_data = data_lib.eval_batches(
            self.corpus.heldout, train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches
        )
        self.tx = make_optimizer(train_cfg)

        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
        count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
        self.num_params = count(nnx.state(abstract, nnx.Param))
        # what trains (all parameters, or a LoRA adapter's) and, with an adapter, its frozen base
        split = (LoraParam, nnx.Param) if model_cfg.lora is not None else (nnx.Param,)
        self.graphdef, abstract_params, *abstract_frozen = nnx.split(abstract, *split)
        self.num_trainable = count(abstract_params)
        self.param_shardings = sharding.state_shardings(mesh, abstract_params)
        self.opt_shardings = sharding.optimizer_shardings(
            self.tx, abstract_params, self.param_shardings, mesh
        )
        self.batch_sharding = sharding.named_sharding(mesh, ("act_batch", None))
        repl = sharding.replicated(mesh)
        init = lambda: nnx.split(Transformer(model_cfg, nnx.Rngs(train_cfg.seed)), *split)
        self._init = jax.jit(lambda: init()[1], out_shardings=self.param_shardings)
        self.frozen_shardings = [sharding.state_shardings(mesh, a) for a in abstract_frozen]
        self.frozen = self._frozen_base(base, abstract_frozen, lambda: init()[2])
        self._opt_init = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        self.step_fn = jax.jit(
            functools.partial(train_step, self.graphdef, self.tx, train_cfg.seed),
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding, repl)
            + tuple(self.frozen_shardings),
            out_shardings=(self.param_shardings, self.opt_shardings, repl),
            donate_argnums=(0, 1),
        )
        self._eval_fns = {}
        self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=train_cfg.keep)
        self.metrics_path = self.workdir / "metrics.jsonl"

    def model(self, params) -> Transformer:
        """A usable model object holding `params` (e.g. for sampling after training)."""
        return nnx.merge(self.graphdef, params, *self.frozen)

    def _frozen_base(self, base, abstract_frozen, init) -> list:
        """[] without an adapter, else [the frozen base on the mesh]: `base`, or `init()`'s."""
        like = lambda s: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), nnx.to_pure_dict(s))
        if base is not None and (not abstract_frozen or like(base) != like(abstract_frozen[0])):
            raise ConfigError("the frozen base does not fit: model.lora unset, or other shapes")
        with jax.set_mesh(self.mesh):
            make = lambda sh: jax.jit(init, out_shardings=sh)() if base is None else base
            return [sharding.place(make(sh), sh) for sh in self.frozen_shardings]

    # -- state ---------------------------------------------------------------

    def init_or_restore(self):
        """Fresh state, or the latest checkpoint's (resharded onto this mesh)."""
        with jax.set_mesh(self.mesh):
            params = self._init()
            opt_state = self._opt_init(params)
        found = self.ckpt.restore_latest(params, opt_state, check=self._check_saved_model)
        if found is None:
            if self.primary and self.metrics_path.exists():
                self.metrics_path.unlink()
            return params, opt_state, 0
        step, params, opt_state, meta = found
        logging.info("resumed from step %d (data position %d)", step, meta["data_position"])
        self._truncate_metrics(step)
        return params, opt_state, int(meta["data_position"])

    def _check_saved_model(self, step: int, meta: dict) -> None:
        """Refuse a checkpoint written for another model; fields added to ModelConfig since it
        was written count as their defaults."""
        saved, now = meta.get("model", {}), self.model_cfg.to_json_dict()
        defaults = ModelConfig(
            **{
                k: v
                for k, v in self.model_cfg.to_dict().items()
                if k in ("vocab_size", "d_model", "n_heads", "n_kv_heads")
            }
        )
        saved = {**{k: v for k, v in defaults.to_json_dict().items() if k not in saved}, **saved}
        if saved and saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise CheckpointError(
                f"checkpoint {step} in {self.ckpt.directory} was written for a different model "
                f"(saved vs now: {diff}); use a fresh --workdir or the same model config. To "
                f"read text from that run: python -m experiments.generate "
                f"--checkpoint={self.ckpt.directory.parent} --prompt='def ' (or serve it: "
                f"python -m experiments.serve --checkpoint={self.ckpt.directory.parent})"
            )

    def _truncate_metrics(self, step: int) -> None:
        """Drop records logged after the checkpoint we resume from, so the curve continues."""
        if not self.primary or not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def device_batch(self, index: int) -> jax.Array:
        local = self.batcher.batch(index)
        return jax.make_array_from_process_local_data(self.batch_sharding, local)

    # -- loop ----------------------------------------------------------------

    def evaluate(self, params, mode: str = "eval", model_cfg: ModelConfig | None = None) -> float:
        """Mean held-out cross-entropy in a model mode ("eval", or "serve": dropless MoE).

        `model_cfg` evaluates the same parameters under another inference
        config of the same shapes (e.g. another MoE capacity factor).
        """
        cfg = model_cfg or self.model_cfg
        if (cfg, mode) not in self._eval_fns:
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
            self._eval_fns[cfg, mode] = jax.jit(
                functools.partial(eval_step, graphdef, mode=mode),
                in_shardings=(self.param_shardings, self.batch_sharding)
                + tuple(self.frozen_shardings),
                out_shardings=sharding.replicated(self.mesh),
            )
        losses = []
        with jax.set_mesh(self.mesh):
            for b in self.eval_data:
                arr = jax.make_array_from_process_local_data(
                    self.batch_sharding, b[self.batcher.rows]
                )
                losses.append(self._eval_fns[cfg, mode](params, arr, *self.frozen))
        return float(np.mean(jax.device_get(losses)))

    def _log(self, record: dict) -> None:
        if self.primary:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def run(self):
        """Train to `steps`, resuming if a checkpoint exists. Returns (params, final eval loss)."""
        from mlx_sched.train import plots

        tc = self.tc
        params, opt_state, start = self.init_or_restore()
        tokens_per_step = tc.batch_size * tc.seq_len
        t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), start
        eval_loss = float("nan")
        kill_at = int(os.environ.get("MLX_SCHED_KILL_AT_STEP", "-1"))
        step_arr = lambda s: jax.device_put(
            jnp.asarray(s, jnp.int32), sharding.replicated(self.mesh)
        )
        for step in range(start, tc.steps):
            batch = self.device_batch(step)
            with jax.set_mesh(self.mesh):
                params, opt_state, metrics = self.step_fn(
                    params, opt_state, batch, step_arr(step), *self.frozen
                )
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                m = {k: _to_json(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step_time = (now - t_last) / (done - last_step)
                tok_s = tokens_per_step / step_time
                t_last, last_step = now, done
                eta = (tc.steps - done) * tokens_per_step / tok_s
                self._log(
                    {
                        "step": done,
                        "split": "train",
                        "lr": lr_at(tc, step),
                        "tok_s": tok_s,
                        "step_time_s": step_time,
                        **m,
                    }
                )
                logging.info(
                    "step %d/%d  loss %.4f  grad_norm %.3f  %.0f tok/s  eta %s",
                    done,
                    tc.steps,
                    m["loss"],
                    m["grad_norm"],
                    tok_s,
                    _fmt_secs(eta),
                )
            if done % tc.eval_every == 0 or done == tc.steps:
                eval_loss = self.evaluate(params)
                self._log({"step": done, "split": "eval", "ce": eval_loss})
                logging.info(
                    "step %d  held-out loss %.4f (%.3f bits/byte)",
                    done,
                    eval_loss,
                    eval_loss / np.log(2),
                )
                if self.primary:
                    plots.loss_curve(self.metrics_path, self.workdir / "loss.png")
            if done % tc.ckpt_every == 0 or done == tc.steps:
                meta = {"step": done, "data_position": done, "model": self.model_cfg.to_json_dict()}
                self.ckpt.save(done, params, opt_state, meta, force=True)
            if done == kill_at:  # fault injection for the resume tests: die like `kill -9`
                os.kill(os.getpid(), signal.SIGKILL)
        self.ckpt.close()
        if start >= tc.steps:
            eval_loss = self.evaluate(params)
        logging.info(
            "trained %d steps in %s", tc.steps - start, _fmt_secs(time.perf_counter() - t_start)
        )
        return params, eval_loss


def _to_json(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()


def _fmt_secs(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def model_config(section: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of a config's model section, whose optional sub-sections (`moe`) a command
    line may set to any literal: only None or a mapping of their fields is a section."""
    moe = section.get("moe")
    if moe is not None and not hasattr(moe, "keys"):  # a dict or a ConfigDict
        raise ConfigError(f"model.moe must be None or a dict of MoE settings, got {moe!r}")
    return ModelConfig.from_dict(section)


def train_from_config(config: Mapping[str, Any], workdir: str | pathlib.Path):
    """Typed configs from a loose mapping (model / mesh / data / train), then train.

    Returns (trainer, params, final held-out loss).
    """
    known = {"kind", "model", "mesh", "data", "train", "sample", "serve", "workload"}
    unknown = set(config) - known
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}")
    train_cfg = TrainConfig.from_dict(config["train"])
    model_cfg, base = with_base(model_config(config["model"]), train_cfg.base)
    data_cfg = dict(config.get("data", {}))
    check_keys(_DataConfig, data_cfg, "data config")
    mesh = sharding.make_mesh(sharding.MeshConfig.from_dict(config.get("mesh", {})))
    trainer = Trainer(
        model_cfg,
        train_cfg,
        mesh,
        workdir,
        data_path=data_cfg.get("path") or None,
        heldout_fraction=data_cfg.get("heldout_fraction", 0.02),
        base=base,
    )
    logging.info(
        "model %s params (%s trained) on mesh %s; corpus %s: %d train / %d held-out tokens",
        f"{trainer.num_params:,}",
        f"{trainer.num_trainable:,}",
        dict(mesh.shape),
        trainer.corpus.source,
        len(trainer.corpus.train),
        len(trainer.corpus.heldout),
    )
    params, eval_loss = trainer.run()
    return trainer, params, eval_loss


@dataclasses.dataclass(frozen=True)
class _DataConfig:
    path: str = ""
    heldout_fraction: float = 0.02
