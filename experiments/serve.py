"""An OpenAI-compatible HTTP server: load a model, warm up, serve until SIGINT / SIGTERM.

  pip install -e '.[server]'
  python -m experiments.serve --checkpoint=runs/lm            # a training run of experiments.train
  python -m experiments.serve --hf_path=/path/to/llama        # a Hugging Face folder
  python -m experiments.serve --config=experiments/configs/serve.py:runlocal --port=8001

Serves on 127.0.0.1:8000 by default (`--host`, `--port`) and prints the URL when
ready. Engine settings come from the config's `serve` section, server settings from
its `server` section (`--config.server.max_waiting=64`, ...). `--profile_seconds=N`
records a `jax.profiler` trace of the first N seconds of serving into
`<workdir>/profiles/`; `POST /admin/profile {"seconds": N}` does it on demand (from
the loopback interface only).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("serve", "default"), "serving config", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a training run folder (or its checkpoints/)")
_HF_PATH = flags.DEFINE_string("hf_path", "", "a Hugging Face Llama/Mixtral folder")
_HOST = flags.DEFINE_string("host", None, "interface to listen on (default: the config's)")
_PORT = flags.DEFINE_integer("port", None, "port (default: the config's, 8000)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/serve", "where profiles go")
_PROFILE = flags.DEFINE_float("profile_seconds", 0.0, "trace the first N seconds of serving")


def build_app(config, checkpoint: str = "", hf_path: str = "", workdir: str = "runs/serve"):
    """The App for `config` (engine warmed up), as `main` serves it."""
    from experiments import serving
    from mlx_sched.server.app import App, ServerSettings

    model, tokenizer, name = serving.load_text_model(config, checkpoint, hf_path)
    s = config.server
    eos = config.serve.get("eos_token", -1)
    if eos < 0 and tokenizer is not None and tokenizer.eos_id is not None:
        eos = tokenizer.eos_id
    logging.info("warming up the engine (compiling its step shapes)")
    engine = serving.make_engine(model, config, eos_token=eos, history=s.history)
    settings = ServerSettings(
        model_name=s.model_name or name,
        max_n=s.max_n,
        max_waiting=s.max_waiting,
        max_body_bytes=s.max_body_bytes,
        shutdown_timeout_s=s.shutdown_timeout_s,
        workdir=workdir,
    )
    return App(engine, tokenizer, settings)


def main(argv):
    del argv
    from mlx_sched.server.app import Server

    config = _CONFIG.value
    common.require_sections(
        config,
        flags.FLAGS["config"].config_filename,
        ("serve", "server", "model"),
        "experiments.serve needs a config with model, serve and server sections "
        "(experiments/configs/serve.py)",
    )
    workdir = common.require_workdir(_WORKDIR.value)
    app = build_app(config, _CHECKPOINT.value, _HF_PATH.value, str(workdir))
    host = _HOST.value if _HOST.value is not None else config.server.host
    port = _PORT.value if _PORT.value is not None else config.server.port

    def ready(server):
        print(
            f"serving '{app.settings.model_name}' at {server.url} (OpenAI API under /v1; "
            f"/health, /metrics); Ctrl-C stops",
            flush=True,
        )
        if _PROFILE.value > 0:
            app.profiler.start(_PROFILE.value)

    Server(app, host, port, on_ready=ready).run()
    print("server stopped", flush=True)


if __name__ == "__main__":
    common.run(main)
