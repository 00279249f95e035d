"""Llumnix on real engines: live migration under a bursty load, migration downtime vs context
length, and headroom for high-priority requests (experiments/migration.py).

Three studies on small random Transformers, each instance an engine on one of the (simulated)
devices, all stepped one after another in this process:

  load_balance  P50/P99 TTFT, TPOT, E2E and preemptions, Llumnix dispatch with and without
                migration, on bursty (Gamma, CV `cv`) heavy-tailed traces at each rate of
                `load_balance.rates`, over instances whose KV pools are small enough that
                requests get preempted
  downtime      forced migrations of one request at each context length (`repeats` each):
                the downtime, stages and bytes of each move, against a stop-and-copy move of
                the same context (a DistServe hand-over: paused while every page is copied)
  priority      latency of high-priority requests (a share `high_share` of the trace) with
                Llumnix's headroom (`headroom_pages` per high-priority request) and without

Variants: default (8-10 minutes on 2 CPU cores with compilations cached; a few more cold),
runlocal (about 30 s: tests).

  python -m experiments.migration                        # docs/results/migration.json + plots
  python -m experiments.migration --config=experiments/configs/migration.py:runlocal \
      --workdir=/tmp/mig
  python -m experiments.migration --config.studies=downtime --workdir=/tmp/mig
"""

import ml_collections

STUDIES = (
    "load_balance,downtime,priority,load_balance_sim"  # comma-separated: --config.studies=downtime
)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of migration.py; choose default or runlocal")
    c = ml_collections.ConfigDict()
    c.studies = STUDIES
    # the load and priority studies' model: small, so 4 instances step fast on 2 cores
    c.model = dict(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=1024,
    )
    # per instance: 47 usable pages of 16 tokens, so a few long requests fill a pool
    c.serve = dict(
        page_size=16,
        num_pages=48,
        max_seqs=16,
        token_budget=128,
        slice_len=1,
        decode_buckets=(16,),
        prefill_buckets=(128,),
        policy="fcfs",
        preemption="recompute",
    )
    c.cluster = dict(
        num_instances=4,
        dispatch="llumnix",
        migration_interval_s=0.05,
        migration_low=4.0,
        max_stages=3,
        last_stage_pages=4,
        chunk_pages=16,
    )
    # the trace: Gamma arrivals (CV `cv`), lengths of lab.workload's preset, clipped to
    # max_total tokens (prompt + output) so any request fits one instance's pool
    c.load = dict(
        num_requests=200,
        rate=24.0,  # the priority study's rate
        cv=3.0,
        preset="heavy_tail",
        length_scale=1.0,
        max_total=512,
        seeds=(0, 1, 2, 3, 4, 5),  # traces: each is served in both arms (a paired comparison)
    )
    c.load_balance = dict(rates=(24.0, 32.0))  # the load study runs at each rate
    # the load study in the simulator: instances side by side, 20 traces per arm
    c.load_balance_sim = dict(rates=(48.0, 96.0), seeds=tuple(range(20)))
    c.warmup_requests = 40  # served once, not measured: the process's first steps are slower
    c.downtime = dict(
        # a wider KV (8 KiB per token) so that copying a long context costs measurable time
        model=dict(
            vocab_size=256,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,
            d_ff=512,
            max_seq_len=4096,
        ),
        serve=dict(
            page_size=16,
            num_pages=320,
            max_seqs=4,
            token_budget=512,
            slice_len=1,
            decode_buckets=(4,),
            prefill_buckets=(512,),
        ),
        num_instances=2,
        lengths=(32, 64, 128, 256, 512, 1024, 2048, 4000),
        repeats=3,
        decode_before=2,  # tokens decoded before the migration starts
        max_tokens=64,  # enough to keep decoding while every stage copies
    )
    c.priority = dict(
        high_share=0.1,  # share of the trace's requests with priority 1
        # the "with headroom" arm's ClusterConfig.headroom_pages: room for a high-priority
        # request of half the longest length (max_total / 2 tokens)
        headroom_pages=16,
        # each instance's own policy, the same in both arms: high-priority requests are
        # admitted first and preempted last (Llumnix's queueing priority), never preempting
        policy="priority",
        policy_args=dict(mode="class", preempt=False),
        seeds=(0, 1, 2, 3, 4, 5),
    )
    if arg == "runlocal":
        c.model.update(vocab_size=128, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
        c.model.max_seq_len = 256
        c.serve.update(num_pages=24, max_seqs=8, token_budget=32)
        c.serve.update(decode_buckets=(8,), prefill_buckets=(32,))
        c.load.update(num_requests=24, rate=60.0, max_total=128, seeds=(0,))
        c.load_balance.rates = (60.0,)
        c.load_balance_sim.update(rates=(60.0,), seeds=(0, 1))
        c.warmup_requests = 4
        c.downtime.model = dict(c.model)
        c.downtime.serve.update(num_pages=48, token_budget=32, prefill_buckets=(32,))
        c.downtime.update(lengths=(16, 96), repeats=1, max_tokens=24)
        c.priority.update(high_share=0.25, headroom_pages=6, seeds=(0,))
    return c
