"""DistServe: prefill/decode disaggregation against colocated instances, as the SLOs tighten
(experiments/disaggregation.py).

Studies:
  real   small scale on this machine: 2 real engines (in process, one device each),
         colocated (2 x both) and disaggregated (1 prefill + 1 decode), served at a few
         request rates; goodput per device read off at each SLO scale; the simulator
         (calibrated on one real engine, one shared host) beside each measurement; the
         placement search's choice validated on the real engines
  sim    large scale in the simulator with DistServe's published OPT-13B step-time model:
         the best colocated and the best disaggregated layout within `num_devices`
         (placement search), goodput per device as the SLOs tighten
  speed  the simulator's speed at cluster scale (16 instances): microseconds per simulated
         batch and requests per second, projected to 1,000,000 requests

  python -m experiments.disaggregation --workdir=runs/disaggregation
  python -m experiments.disaggregation --config=experiments/configs/disaggregation.py:runlocal \
      --workdir=/tmp/dis
"""

import ml_collections

from experiments.configs import lm


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(
            f"unknown variant '{arg}' of disaggregation.py; choose default or runlocal"
        )
    model = lm.get_config("default").model.to_dict()
    model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=512)
    c = ml_collections.ConfigDict()
    c.kind = "disaggregation"
    c.studies = ("real", "sim", "speed")
    c.slo_scales = (4.0, 2.0, 1.5, 1.0, 0.5, 0.25)  # x the base SLO; smaller: tighter
    c.real = dict(
        model=model,
        serve=dict(
            page_size=16, num_pages=512, max_seqs=16, token_budget=128, slice_len=4, history=-1
        ),
        fit=dict(preset="sharegpt", rate=20.0, num_requests=80, length_scale=0.25, seed=1),
        workload=dict(
            preset="sharegpt", max_total=512, length_scale=0.25, num_requests=60, min_duration_s=4.0
        ),
        rates=(4.0, 8.0, 16.0, 32.0, 64.0),
        # base SLO: these multiples of the colocated pair's P50 TTFT / TPOT at the lowest rate
        base_ttft_x=4.0,
        base_tpot_x=1.5,
    )
    c.sim = dict(
        # DistServe's OPT-13B shapes (KV bytes per token) and step-time model, per GPU
        model=dict(
            vocab_size=50272,
            d_model=5120,
            n_layers=40,
            n_heads=40,
            n_kv_heads=40,
            d_ff=20480,
            max_seq_len=2048,
            dtype="bfloat16",
        ),
        serve=dict(page_size=16, num_pages=4096, max_seqs=128, token_budget=2048, slice_len=1),
        cost_ms=dict(  # reference/algorithms.md: prefill a + b*sum(l) + c*sum(l^2); decode
            base_mixed=18.10,
            per_prefill_token=0.1019,
            per_prefill_pair=7.12e-6,
            base_decode=19.93,
            per_decode_ctx=6.27e-4,
            per_decode_token=0.0385,
        ),
        workload=dict(preset="sharegpt", max_total=2048, num_requests=100, min_duration_s=10.0),
        base_slo=(2.5, 0.15),  # DistServe's chatbot SLOs for OPT-13B (TTFT s, TPOT s)
        num_devices=4,
        start_rate=1.0,
        rate_factor=1.25,  # goodput read off a grid of rates growing by this factor
    )
    c.speed = dict(instances=16, num_requests=20000, rate=400.0, preset="sharegpt")
    if arg == "runlocal":
        c.slo_scales = (4.0, 1.0)
        c.real.model.update(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
        c.real.serve.update(num_pages=128, max_seqs=8, token_budget=32)
        c.real.fit.update(num_requests=16, length_scale=0.1)
        c.real.workload.update(max_total=128, length_scale=0.2, num_requests=8)
        c.real.rates = (4.0, 16.0)
        c.sim.workload.num_requests = 30
        c.sim.num_devices = 2
        c.sim.rate_factor = 2.0
        c.speed.update(instances=4, num_requests=200)
    return c
