"""The engine: `step()` = schedule -> run -> postprocess.

    engine = Engine(model, ServeConfig(...))
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_work():
        for out in engine.step():
            print(out.request_id, out.new_tokens)

`generate(prompts, sampling)` does the loop for offline use; `stream(rid)`
yields a request's tokens as they are produced. Requests move between engines with
the `serve.handoff` methods (export, read and write KV, import, detach).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence

import jax

from mlx_sched.serve import metrics as metrics_lib
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.driving import Driving
from mlx_sched.serve.handoff import Handoff
from mlx_sched.serve.interface import StepResult, StepRunner
from mlx_sched.serve.kv_store import HostKVStore
from mlx_sched.serve.paging import PagePool
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies import make_policy
from mlx_sched.serve.postprocess import Postprocess
from mlx_sched.serve.request import (
    NUM_STOP_IDS,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    Status,
    validate_prompt,
)
from mlx_sched.serve.scheduler import Scheduler


class Engine(Handoff, Driving, Postprocess):
    KV_STATS_EVERY = 16  # exact KV-occupancy statistics cost a pass over every page: sample them

    def __init__(
        self,
        model,
        cfg: ServeConfig | None = None,
        mesh: jax.sharding.Mesh | None = None,
        clock: Callable[[], float] = time.perf_counter,
        warmup: bool = True,
        runner: StepRunner | None = None,
        draft_model=None,
    ):
        """`runner` replaces the device runner (e.g. `lab.simulator.SimRunner`); `clock` is the
        time source of every timestamp (a `SimClock` in simulation); `draft_model` is the
        drafter of `serve.speculative.kind='draft_model'`."""
        self.cfg = cfg or ServeConfig()
        self.model_cfg = model.cfg
        if runner is None:
            from mlx_sched.serve.runner import Runner  # jax device code: only when needed

            runner = Runner(model, self.cfg, mesh)
        self.runner = runner
        self.max_len = self.runner.max_len
        self.pool = PagePool(self.cfg.num_pages, self.cfg.page_size)
        self.store = HostKVStore()
        self.sched = Scheduler(self.cfg, self.pool, self.store)
        self.policy = make_policy(self.cfg.policy, self.cfg)
        self.policy.bind(self.sched)
        self.adapters = None  # many LoRA adapters (S-LoRA): serve.adapters.AdapterPool
        if self.cfg.lora:
            from mlx_sched.serve.adapters import AdapterPool

            self.adapters = AdapterPool.build(self.cfg, self.pool, self.runner)
        self.clock = clock
        # live requests, then the `history` most recently retired ones (a server never grows)
        self.requests: dict[str, Request] = {}
        self._retired: collections.deque[str] = collections.deque()
        keep = None if self.cfg.history < 0 else self.cfg.history
        self._steps_kept: collections.deque[metrics_lib.StepRecord] = collections.deque(maxlen=keep)
        # the retired requests whose metrics `request_metrics` reports (computed on demand:
        # a retired request does not change)
        self._records: collections.deque[Request] = collections.deque(maxlen=keep)
        self.totals = metrics_lib.Totals()
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self._ids = itertools.count()
        self._order = itertools.count()
        self._steps, self._kv = 0, (0, 0)
        self._stops: dict[str, frozenset[int]] = {}
        self._imports: dict[str, list[int]] = {}  # pages reserved for requests moving here
        self.spec = None  # speculative decoding (mlx_sched.speculative), when configured
        if self.cfg.spec is not None or draft_model is not None:
            from mlx_sched.speculative.speculator import Speculator

            self.spec = Speculator.build(self.cfg, model.cfg, draft_model, mesh)
        if warmup:
            n = self.runner.warmup(
                lambda i, n, shape: logging.info("warm-up %d/%d: %s", i + 1, n, shape)
            )
            logging.info("warm-up compiled %d shapes", n)
            if self.spec is not None:
                self.spec.warmup(self.runner)

    # -- requests -------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        client: str = "default",
        priority: int = 0,
        arrival: float | None = None,
        deadline: float | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        adapter: str | None = None,
    ) -> str:
        """Validate and queue a request; raises RequestError (nothing queued) if invalid.
        `adapter`: a registered LoRA adapter's name (as `SamplingParams.adapter`)."""
        sampling = sampling or SamplingParams()
        if adapter is not None and isinstance(sampling, SamplingParams):
            sampling = dataclasses.replace(sampling, adapter=adapter)
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        tokens = validate_prompt(
            prompt, self.model_cfg.vocab_size, self.max_len, sampling.max_tokens
        )
        bad_stop = [t for t in sampling.stop_tokens if not 0 <= t < self.model_cfg.vocab_size]
        if bad_stop:
            raise RequestError(f"stop tokens outside the vocabulary: {bad_stop}")
        if len(sampling.stop_tokens) + 1 >= NUM_STOP_IDS:  # room for EOS, and one to spare
            raise RequestError(f"at most {NUM_STOP_IDS - 2} stop tokens per request")
        self.sched.check_fits(len(tokens), sampling)
        if self.adapters is not None:  # its adapter is known, and fits beside its KV
            self.adapters.check(sampling, self.pool.pages_for(len(tokens) + sampling.max_tokens))
        elif sampling.adapter is not None:
            raise RequestError(f"adapter '{sampling.adapter}' given, but serve.lora is off")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id '{rid}' is already in use")
        now = self.clock() if arrival is None else arrival
        if deadline is not None and deadline < now:
            raise RequestError(f"TTFT deadline {deadline:.3f} is in the past (now {now:.3f})")
        req = Request(rid, tokens, sampling, now, client, priority, deadline, next(self._order))
        self.requests[rid] = req
        # a request with an adapter waits for its adapter's slot first (`adapters.admit`)
        (self.sched.waiting if sampling.adapter is None else self.adapters.parked).append(req)
        self.policy.on_arrival(req, now)
        if on_output is not None:
            self._callbacks[rid] = on_output
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; unknown or finished ids are a RequestError."""
        req = self.requests.get(request_id)
        if req is None:
            raise RequestError(f"unknown request id '{request_id}'")
        if req.is_finished:
            raise RequestError(f"request '{request_id}' already {req.status.value}")
        for queue in (self.sched.waiting, self.sched.running, self.sched.swapped):
            if req in queue:
                queue.remove(req)
        self.sched.paused.pop(request_id, None)
        for s in req.seqs:
            self.sched.free_seq(s)
            s.done = True
            s.finish_reason = s.finish_reason or "abort"
        req.status, req.finished_at = Status.ABORTED, self.clock()
        self._stops.pop(req.id, None)
        self._callbacks.pop(req.id, None)
        self.policy.on_finish(req, req.finished_at)
        self._retire(req)

    def _retire(self, req: Request) -> None:
        """A finished or aborted request leaves the engine's state; its metrics go into the
        totals and the bounded history."""
        m = metrics_lib.request_metrics(req, itl=False)  # what the totals read
        if self.adapters is not None:
            self.adapters.release(req)
        if self.spec is not None:
            self.spec.forget(req)
        self.totals.observe(m)
        self._records.append(req)
        if self.cfg.history >= 0:
            self._retired.append(req.id)
            while len(self._retired) > self.cfg.history:
                del self.requests[self._retired.popleft()]

    def has_work(self) -> bool:
        return self.sched.has_work() or bool(self.adapters and self.adapters.parked)

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (vLLM's `reset_prefix_cache`): later requests compute their
        prompts in full, e.g. the timed runs of a benchmark that repeats its prompts. Pages
        of running requests stay theirs. -> pages that left the cache."""
        return self.pool.clear_prefix_cache()

    def register_adapter(self, name: str, source) -> None:
        """Register a LoRA adapter (a PEFT folder, a model with an adapter, or (LoraConfig,
        {(layer, target): (A, B)})) in host memory for requests that name it; an AdapterError
        (one line) if it does not fit serve.lora or the base model."""
        if self.adapters is None:
            raise RuntimeError("register_adapter needs serve.lora (an adapter pool)")
        self.adapters.register(name, source)

    def update_params(self, updates) -> int:
        """Serve from now on with some parameters replaced (`Runner.update_params`: MoE routers,
        norms or adapters, no recompilation). Only between batches: KV computed with the old
        parameters would mix with the new, so running or swapped requests are a RuntimeError
        (waiting ones are fine) and the prefix cache is cleared. -> parameters updated."""
        busy = len(self.sched.running) + len(self.sched.swapped) + len(self.sched.paused)
        if busy:
            raise RuntimeError(f"update_params with {busy} requests running or swapped out")
        n = self.runner.update_params(updates)
        self.pool.clear_prefix_cache()
        return n

    # -- the loop ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.adapters is not None:  # requests whose adapter (now) holds a slot may run
            self.adapters.admit(self.sched)
        if self.spec is not None:
            self.spec.prepare(self.sched.running)
        plan = self.policy.schedule(self.sched, self.clock())
        spec = self.spec.fill(plan, self.sched.running) if self.spec is not None else None
        if not plan.work:
            self._move_kv(plan)
            self.sched.release(plan)
            if self.sched.has_work() and not self.sched.running:
                if not (self.adapters and self.adapters.unpin_waiting(self.sched.waiting)):
                    self._fail_unschedulable()
            elif self.sched.running and plan.empty:
                raise RuntimeError(
                    f"policy '{self.policy.name}' scheduled nothing with "
                    f"{len(self.sched.running)} running and {len(self.sched.waiting)} waiting "
                    "requests: a scheduling deadlock (a policy bug)"
                )
            return []
        t1 = time.perf_counter()
        self._move_kv(plan)
        result = self.runner.run(plan)
        self.sched.release(plan)
        t2 = time.perf_counter()
        decodes, prefills = plan.split()  # as they were when the step ran
        outputs = self._postprocess(plan, result, spec)
        new_tokens = 0
        for o in outputs:
            for t in o.new_tokens:
                new_tokens += len(t)
        post_s = time.perf_counter() - t2
        self._record(
            decodes, prefills, result, (t1 - t0) + result.build_s, post_s, new_tokens, spec
        )
        return outputs

    def _move_kv(self, plan: StepPlan) -> None:
        """The plan's KV movement before its device step: reads to host first, then writes."""
        for t in plan.swap_out:
            self.store.fill(t.seq_id, *self.runner.read_pages(t.pages))
        for t in plan.swap_in:
            self.runner.write_pages(t.pages, *self.store.take(t.seq_id))

    def _fail_unschedulable(self) -> None:
        """Nothing running and nothing admissible: the head request can never fit; fail it."""
        req = self.sched.waiting[0] if self.sched.waiting else self.sched.swapped[0]
        req.error = "cannot be scheduled: not enough KV pages even with the engine idle"
        logging.error("request %s %s", req.id, req.error)
        self.abort(req.id)

    def _record(
        self, decodes, prefills, result: StepResult, pre_s, post_s, new_tokens: int, spec=None
    ):
        """`pre_s`: host seconds before the tokens are stamped (schedule, batch building);
        `post_s`: after (postprocess)."""
        self._steps += 1
        if self._steps % self.KV_STATS_EVERY == 1 or self.KV_STATS_EVERY == 1:
            self._kv = self.sched.kv_occupancy()
        rec = metrics_lib.StepRecord(
            t=self.clock(),
            kind=result.kind,
            shape=result.shape,
            num_decode=len(decodes),
            num_prefill_tokens=sum(n for _, n in prefills),
            num_prefill_seqs=len(prefills),
            decode_ctx=sum(s.num_computed for s, _ in decodes),
            prefill_attn=sum(n * s.num_computed for s, n in prefills),  # after the step
            iters=result.iters,
            new_tokens=new_tokens,
            running=self.sched.num_running_seqs,
            waiting=len(self.sched.waiting),
            pages_in_use=self._kv[0],
            live_tokens=self._kv[1],
            host_s=pre_s + post_s,
            device_s=result.device_s,
            page_size=self.cfg.page_size,
            post_s=post_s,
            **(spec.fields() if spec is not None else {}),
        )
        self._steps_kept.append(rec)
        self.sched.cost.observe(rec)
        if self.spec is not None:
            self.spec.on_step(rec)
        self.policy.on_step(rec)

    # -- conveniences -------------------------------------------------------------------

    def _done(self, request: Request) -> bool:
        return request.is_finished

    def _final(self, request: Request) -> RequestOutput:
        return RequestOutput(request.id, [], True, request)

    @property
    def step_records(self) -> list[metrics_lib.StepRecord]:
        """The most recent `history` steps' records (all with history=-1)."""
        return list(self._steps_kept)

    def request_metrics(self) -> list[dict]:
        """Metrics of the retired requests in the history, then of the live ones."""
        live = [r for r in self.requests.values() if not r.is_finished]
        return [*map(metrics_lib.request_metrics, [*self._records, *live])]

    def summary(self, wall_s: float) -> dict:
        out = metrics_lib.summarize(self.request_metrics(), list(self.step_records), wall_s)
        if self.adapters is not None:
            out["adapters"] = self.adapters.stats()
        return out
