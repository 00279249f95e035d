"""The HTTP application (Starlette) and its server (uvicorn).

    app = App(engine, tokenizer, ServerSettings(model_name="tiny"))
    Server(app, host="127.0.0.1", port=8000).run()   # until SIGINT / SIGTERM

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /health`, `GET /metrics` (Prometheus), `POST /admin/profile` (a `jax.profiler`
trace of the next N seconds into the workdir; answered only to clients on the
loopback interface).

Shutdown (SIGINT, SIGTERM, or `ServerThread.stop`): new requests are answered 503
at once, requests in flight finish (streams included) for up to
`shutdown_timeout_s`, the rest are aborted, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import threading
import time

import prometheus_client
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlx_sched.serve.engine import Engine
from mlx_sched.server import delivery
from mlx_sched.server import text as text_lib
from mlx_sched.server.completions import Generation, Limits
from mlx_sched.server.engine_thread import EngineThread
from mlx_sched.server.prom import make_registry
from mlx_sched.server.protocol import ApiError, ChatRequest, CompletionRequest, parse

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model_name: str = "mlx_sched"
    max_n: int = 8  # most samples per prompt
    max_waiting: int = 256  # requests not yet admitted before 503 + Retry-After
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long at shutdown
    workdir: str = "runs/serve"  # profiles go to <workdir>/profiles/

    def __post_init__(self):
        for name in ("max_n", "max_waiting", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(
                f"server.shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}"
            )


class Profiler:
    """One `jax.profiler` trace at a time, for a given number of seconds."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self._lock = threading.Lock()
        self.active: str | None = None

    def start(self, seconds: float) -> str:
        import jax

        with self._lock:
            if self.active is not None:
                raise ApiError(409, f"a profile is already being recorded into {self.active}")
            path = self.workdir / "profiles" / time.strftime("%Y%m%d-%H%M%S")
            path.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(path))
            self.active = str(path)
        threading.Timer(seconds, self._stop).start()
        logging.info("recording a profile for %.1f s into %s", seconds, path)
        return str(path)

    def _stop(self) -> None:
        import jax

        with self._lock:
            jax.profiler.stop_trace()
            logging.info("profile written to %s", self.active)
            self.active = None


class App:
    """The routes over one engine, owned by an `EngineThread`."""

    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings | None = None):
        self.settings = settings or ServerSettings()
        self.tokenizer = tokenizer
        self.thread = EngineThread(engine, self.settings.max_waiting)
        self.registry, self.http_answers = make_registry(self.thread)
        self.limits = Limits(engine.max_len, engine.model_cfg.vocab_size, self.settings.max_n)
        self.profiler = Profiler(pathlib.Path(self.settings.workdir))
        self.created = int(time.time())
        routes = [
            Route("/health", self._wrap("health", self.health), methods=["GET"]),
            Route("/v1/models", self._wrap("models", self.models), methods=["GET"]),
            Route("/v1/completions", self._wrap("completions", self.completions), methods=["POST"]),
            Route(
                "/v1/chat/completions",
                self._wrap("chat_completions", self.chat_completions),
                methods=["POST"],
            ),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/admin/profile", self._wrap("profile", self.profile), methods=["POST"]),
        ]
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if not self.thread.alive:
            self.thread.start()
        yield
        aborted = await asyncio.to_thread(self.thread.shutdown, 1.0)
        if aborted:
            logging.warning("shutdown: aborted %d requests still in flight", aborted)

    def _wrap(self, endpoint: str, handler):
        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as e:
                response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            self.http_answers.labels(endpoint, str(response.status_code)).inc()
            return response

        return route

    # -- routes ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        t = self.thread
        if t.failure is not None:
            return JSONResponse({"status": "failed", "error": t.failure}, status_code=503)
        if t.draining or not t.alive:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "waiting": t.waiting, "active": t.active})

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx_sched",
            "max_model_len": self.limits.max_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        data = await asyncio.to_thread(prometheus_client.generate_latest, self.registry)
        self.http_answers.labels("metrics", "200").inc()
        return Response(data, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await self._body(request))
        self._check_model(body.model)
        return await self._generate(
            request,
            Generation(body, self._prompts(body.prompt), self.tokenizer, self.limits, body.model),
        )

    async def chat_completions(self, request: Request) -> Response:
        body = parse(ChatRequest, await self._body(request))
        self._check_model(body.model)
        if self.tokenizer is None:
            raise ApiError(400, "chat needs a tokenizer; this model has none", param="messages")
        try:
            prompt = self.tokenizer.encode_chat([m.plain() for m in body.messages])
        except text_lib.TextError as e:
            raise ApiError(400, str(e), param="messages") from None
        gen = Generation(body, [prompt], self.tokenizer, self.limits, body.model)
        return await self._generate(request, gen)

    async def profile(self, request: Request) -> Response:
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            raise ApiError(
                403,
                "the admin endpoints answer only on the loopback interface",
                type="permission_error",
            )
        raw = await self._body(request)
        seconds = 5.0
        if raw.strip():
            import json

            try:
                seconds = float(json.loads(raw).get("seconds", seconds))
            except (ValueError, TypeError, AttributeError):
                raise ApiError(400, 'body must be {"seconds": N}', param="seconds") from None
        if not 0 < seconds <= 600:
            raise ApiError(400, f"seconds must be in (0, 600], got {seconds}", param="seconds")
        path = self.profiler.start(seconds)
        return JSONResponse({"path": path, "seconds": seconds})

    # -- helpers ------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise ApiError(
                400,
                f"model '{name}' is not served here; this server serves "
                f"'{self.settings.model_name}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
                p = self.tokenizer.encode(p)
            if not p:
                where = "prompt" if len(prompt) == 1 else f"prompt.{i}"
                raise ApiError(400, "empty prompt: a request needs at least one token", where)
            out.append(list(p))
        return out

    async def _generate(self, request: Request, gen: Generation) -> Response:
        pipe = await delivery.start(gen, self.thread)
        if gen.body.stream:
            return StreamingResponse(
                delivery.stream(gen, pipe, self.thread),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        work = asyncio.ensure_future(delivery.collect(gen, pipe, self.thread))
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            return JSONResponse(work.result())
        work.cancel()  # the client left: its requests are aborted by collect's cleanup
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=499)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------
# Serving


class _Uvicorn(uvicorn.Server):
    """uvicorn that drains the engine the moment a shutdown signal arrives, and exits 0
    after a graceful shutdown rather than re-raising the signal."""

    def __init__(self, config: uvicorn.Config, on_exit, on_ready=None):
        super().__init__(config)
        self._on_exit, self._on_ready = on_exit, on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


class Server:
    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 8000,
        log_level: str = "info",
        on_ready=None,
    ):
        """`port=0` picks a free port (`url` says which); `on_ready(server)` is called once
        the socket listens."""
        self.app = app
        config = uvicorn.Config(
            app.starlette,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=max(1, round(app.settings.shutdown_timeout_s)),
            lifespan="on",
        )
        ready = (lambda: on_ready(self)) if on_ready is not None else None
        self.uvicorn = _Uvicorn(config, on_exit=app.thread.drain, on_ready=ready)
        self.host = host

    @property
    def port(self) -> int:
        return self.uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT / SIGTERM (from the main thread)."""
        self.uvicorn.run()

    def start_thread(self, timeout_s: float = 60.0) -> Server:
        """Serve from a background thread (tests, notebooks); `stop()` ends it."""
        self._thread = threading.Thread(target=self.uvicorn.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """What a shutdown signal does: drain, finish or abort in-flight requests, stop."""
        self.app.thread.drain()
        self.uvicorn.should_exit = True
        self._thread.join()
