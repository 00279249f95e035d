"""What the engine tests of several model families share: small serving settings (pages of
4 tokens, 4 sequences, one decode and one prefill bucket, slices of 3 tokens)."""

from mlx_sched.serve.config import ServeConfig

SERVE = ServeConfig(
    page_size=4,
    num_pages=96,
    max_seqs=4,
    token_budget=32,
    max_prefill_rows=2,
    slice_len=3,
    decode_buckets=(4,),
    prefill_buckets=(32,),
)
