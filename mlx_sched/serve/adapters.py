"""S-LoRA on the host: adapters registered in host memory, loaded into device slots on demand
(LRU), admission of the requests whose adapter holds a slot, and the adapters' share of the
engine's KV page budget.

A request naming an adapter (`SamplingParams.adapter`) waits in `parked` until its adapter
holds a device slot; then it joins the scheduler's queue, its slot pinned until it finishes
or is aborted. An adapter pinned by a request is never evicted; an unpinned one stays
resident (so a later request finds it) until its slot or its pages are wanted, least
recently used first. Only requests in the scheduler pin slots and they all finish, so a
parked request waits, never fails, and never deadlocks the engine; and when nothing runs
because the head's KV does not fit beside the adapters pinned by the requests behind it,
those give their pins back and wait (`unpin_waiting`).

Pages (`paging`), a KV page = page_size tokens' K and V in every layer:
- "unified" (S-LoRA): a page holds either KV or adapter weights. A resident adapter of rank
  r holds `layout.pages(r)` pages of the engine's PagePool, taken when it is loaded (its
  weights are written into them, `models/lora_pool.py`) and returned when it is evicted; an
  idle adapter's pages are given up when the KV cache needs them, so a burst of adapters and
  a burst of long contexts trade space, and a rank-4 adapter takes a quarter of the pages of
  a rank-16 one.
- "fixed": a dedicated pool: each slot owns the pages of a max_rank adapter, reserved at
  start-up, whatever the adapters' ranks.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys
from models.lora_config import TARGETS

PAGING = ("unified", "fixed")
SERVED_TARGETS = tuple(t for t in TARGETS if t != "router")


class AdapterError(ValueError):
    """An adapter cannot be registered; the message says why."""


@dataclasses.dataclass(frozen=True)
class LoraServeConfig:
    """`serve.lora`: adapters of rank <= max_rank on `targets`, `slots` resident at once."""

    max_rank: int = 16
    slots: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    paging: str = "unified"

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        object.__setattr__(self, "targets", tuple(sorted(set(targets), key=TARGETS.index)))

        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"serve.lora.{msg}")

        need(isinstance(self.max_rank, int) and self.max_rank > 0, "max_rank must be an int > 0")
        need(isinstance(self.slots, int) and self.slots > 0, "slots must be an int > 0")
        need(self.paging in PAGING, f"paging must be one of {PAGING}, got {self.paging!r}")
        bad = [t for t in targets if t not in SERVED_TARGETS]
        need(
            not bad and bool(self.targets),
            f"targets must be among {SERVED_TARGETS} (the router's adapter is not served from "
            f"a pool), got {tuple(targets)}",
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraServeConfig:
        d = dict(d)
        check_keys(cls, d, "serve.lora")
        return cls(**d)


@dataclasses.dataclass
class HostAdapter:
    name: str
    rank: int
    scale: float
    weights: dict  # (layer, target) -> (A, B) float32 numpy arrays at `rank`
    pages: int  # KV pages it takes when resident ("unified")


class AdapterPool:
    """Registered adapters, the device slots they occupy, and the requests waiting for one."""

    def __init__(self, cfg: LoraServeConfig, pool, device, specs, layout):
        self.cfg, self.pool, self.device, self.specs = cfg, pool, device, specs
        self.layout = layout
        self.registry: dict[str, HostAdapter] = {}
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
        self.free_slots = list(range(cfg.slots, 0, -1))
        self.pins: collections.Counter[str] = collections.Counter()
        self.pages_of: dict[str, list[int]] = {}
        self.parked: collections.deque = collections.deque()
        self.loads = self.evictions = self.idle_pages = 0
        self.hold = False  # `unpin_waiting` made room for the head: admit once it runs
        self.reserved: list[int] = []
        if cfg.paging == "fixed":
            n = cfg.slots * layout.max_pages
            if n > pool.num_pages - 2:
                raise ConfigError(f"serve.lora: a fixed pool of {n} pages leaves no KV pages")
            self.reserved = pool.allocate(n)
        else:
            pool.reclaimer = self

    @classmethod
    def build(cls, cfg, pool, runner) -> AdapterPool:
        """The pool of an engine: the runner's device slots and page layout."""
        dev = runner.adapter_slots
        return cls(cfg.lora_cfg, pool, dev, runner.lora_specs, runner.lora_layout)

    def pages_for(self, rank: int) -> int:
        """KV pages an adapter of rank `rank` takes."""
        return self.layout.pages(rank)

    def _fixed_pages(self, slot: int) -> list[int]:
        P = self.layout.max_pages
        return self.reserved[(slot - 1) * P : slot * P]

    # -- registering --------------------------------------------------------------------

    def register(self, name: str, source) -> HostAdapter:
        """Read an adapter (a PEFT folder or a model with an adapter) into host memory."""
        from models import lora_pool

        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter's name must be a non-empty str, got {name!r}")
        if name in self.registry:
            raise AdapterError(f"adapter '{name}' is already registered")
        try:
            lcfg = lora_pool.adapter_config(source)
            if lcfg.rank > self.cfg.max_rank:
                raise ValueError(
                    f"rank {lcfg.rank} exceeds serve.lora.max_rank={self.cfg.max_rank}"
                )
            outside = [t for t in lcfg.targets if t not in self.cfg.targets]
            if outside:
                raise ValueError(
                    f"targets {outside} are outside serve.lora.targets {self.cfg.targets}"
                )
            _, weights = lora_pool.read_adapter(source, self.specs)
        except ValueError as e:
            raise AdapterError(f"adapter '{name}': {e}") from e
        pages = self.pages_for(lcfg.rank)
        if self.cfg.paging == "unified" and pages > self.pool.num_pages - 2:
            raise AdapterError(f"adapter '{name}' needs {pages} pages, more than the pool holds")
        ad = self.registry[name] = HostAdapter(name, lcfg.rank, lcfg.scale, weights, pages)
        return ad

    def check(self, sampling, kv_pages: int) -> None:
        """A RequestError unless the request's adapter (if any) is registered and its KV fits
        beside the adapter's pages (unified) or the fixed reserve."""
        from mlx_sched.serve.request import RequestError

        ad = self.registry.get(sampling.adapter)
        if ad is None and sampling.adapter is not None:
            known = sorted(self.registry)[:5]
            raise RequestError(f"unknown adapter '{sampling.adapter}' (registered: {known})")
        held = len(self.reserved) + (ad.pages if ad is not None and not self.reserved else 0)
        if held + kv_pages * sampling.n > self.pool.num_pages - 1:
            raise RequestError(
                f"request needs {kv_pages * sampling.n} KV pages beside {held} adapter pages: "
                f"more than the pool's {self.pool.num_pages - 1}"
            )

    # -- admission ----------------------------------------------------------------------

    def admit(self, sched) -> None:
        """Move parked requests whose adapter holds (or now gets) a slot to the scheduler's
        queue. In arrival order: once one cannot load its adapter, later ones join only on a
        resident adapter (the head is not overtaken by loads). Held while `unpin_waiting`
        made room for the head and nothing runs yet."""
        if self.hold and not sched.running:
            return
        self.hold = False
        waiting = sched.waiting
        still, blocked = collections.deque(), False
        while self.parked:
            req = self.parked.popleft()
            name = req.sampling.adapter
            if (name in self.slot_of or not blocked) and self._acquire(req):
                waiting.append(req)
            else:
                blocked = True
                still.append(req)
        self.parked = still

    def unpin_waiting(self, waiting) -> bool:
        """Nothing runs and the head of `waiting` cannot start: the waiting requests behind it
        give their adapters' pins back (idle adapters' pages can go to the head's KV) and park
        again, first in line, until something runs. -> whether any did (else the head
        cannot be scheduled at all)."""
        behind = [r for r in list(waiting)[1:] if r.adapter_slot]
        for req in reversed(behind):
            waiting.remove(req)
            self.release(req)
            self.parked.appendleft(req)
        self.hold = bool(behind)
        return self.hold

    def release(self, req) -> None:
        """A request finished or was aborted: unpin its adapter (it stays resident)."""
        if req.sampling.adapter is None:
            return
        if req in self.parked:
            self.parked.remove(req)
        if req.adapter_slot:
            name = req.sampling.adapter
            self.pins[name] -= 1
            if not self.pins[name]:
                del self.pins[name]
                self.idle_pages += len(self.pages_of[name])
            req.adapter_slot = 0

    def _acquire(self, req) -> bool:
        name = req.sampling.adapter
        if name not in self.slot_of and not self._load(self.registry[name]):
            return False
        self.slot_of.move_to_end(name)
        if not self.pins[name]:
            self.idle_pages -= len(self.pages_of[name])
        self.pins[name] += 1
        req.adapter_slot = self.slot_of[name]
        return True

    def _load(self, ad: HostAdapter) -> bool:
        """Copy `ad` into a slot (evicting the least recently used idle adapter if none is
        free); False when every slot is pinned or its pages are not available."""
        victim = None
        if not self.free_slots:
            victim = next((n for n in self.slot_of if not self.pins[n]), None)
            if victim is None:
                return False
        unified = self.cfg.paging == "unified"
        if unified and ad.pages > self.pool.num_available:
            return False
        if victim is not None:
            self._evict(victim)
        pages = self.pool.allocate(ad.pages) if unified else []
        slot = self.free_slots.pop()
        where = pages if unified else self._fixed_pages(slot)
        self.device.write(slot, where, ad.weights, ad.scale, ad.rank)
        self.slot_of[ad.name], self.pages_of[ad.name] = slot, pages
        self.idle_pages += len(pages)
        self.loads += 1
        return True

    def _evict(self, name: str) -> None:
        pages = self.pages_of.pop(name)
        slot = self.slot_of.pop(name)
        self.device.clear(slot)  # before its pages can hold KV
        self.free_slots.append(slot)
        self.idle_pages -= len(pages)
        self.pool.free(pages)
        self.evictions += 1

    # -- the page pool's reclaimer (unified paging) -------------------------------------

    @property
    def reclaimable(self) -> int:
        """Pages that idle (resident, unpinned) adapters give up on demand."""
        return self.idle_pages

    def reclaim(self, n: int) -> None:
        """Evict idle adapters, least recently used first, until n pages are freed."""
        for name in [n_ for n_ in self.slot_of if not self.pins[n_]]:
            if n <= 0:
                return
            n -= len(self.pages_of[name])
            self._evict(name)

    # -- metrics ------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "registered": len(self.registry),
            "resident": len(self.slot_of),
            "pinned": len(self.pins),
            "parked": len(self.parked),
            "loads": self.loads,
            "evictions": self.evictions,
            "pages": sum(map(len, self.pages_of.values())) + len(self.reserved),
        }
