"""An OpenAI-compatible HTTP server over one engine.

- `engine_thread.py` `EngineThread`: the one thread that owns the `Engine`; request
                handlers submit and abort through a thread-safe queue and receive
                each step's new tokens as events
- `text.py`     tokenizers (Hugging Face `tokenizer.json`, the byte-level tokenizer of
                the framework's own models), chat templates, incremental
                detokenization, stop strings matched on text
- `protocol.py` the request bodies (pydantic), their validation and OpenAI-style errors
- `completions.py` one HTTP request's life: prompts to engine requests, events to
                choices (stop strings, logprobs, usage), OpenAI's objects and chunks
- `delivery.py` the engine thread's events on the handler's event loop; a completion
                submitted, then answered whole or streamed as server-sent events
- `prom.py`     the Prometheus collector (`/metrics`)
- `app.py`      the FastAPI application and `Server` (uvicorn, graceful shutdown,
                on-demand profiling)

Imports `mlx_sched.serve` and `mlx_sched.train.data` (the byte tokenizer); FastAPI,
uvicorn and prometheus_client are the optional extra `pip install -e '.[server]'`.
"""
