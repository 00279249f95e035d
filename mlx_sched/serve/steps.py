"""Pure device steps of the serving engine, jitted by the runner with the KV cache donated.

- `mixed_step`: one iteration over decode slots plus chunked-prefill rows
  (Sarathi-Serve's piggybacked batch); a decode slot computes L positions (its
  last token and L - 1 draft tokens) and samples after each of them; a prefill
  row samples after its last token.
- `decode_slice`: up to S decode iterations inside one call (a
  `lax.while_loop`), sampling on device, stopping per slot on a stop token or
  its token allowance, and leaving the loop early when every slot is done.
- `copy_pages`, `read_pages`, `write_pages`: copy-on-write copies, and KV transfers
  to and from host memory (swap; later transfer between engines).

Each takes `(graphdef, params, tables, k, v, batch)` where `tables` are serving-side
copies of weights made once (`pack_table`) and `batch` is the host's
one bundle of small arrays, and returns the new cache with small outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_sched.serve.sampling import sample
from models.paged_context import PagedContext
from sharding.rules import constrain


def copy_pages(k, v, src_M, dst_M):
    """Copy pages src -> dst in every layer (copy-on-write); padding copies 0 -> 0."""
    return k.at[:, dst_M].set(k[:, src_M]), v.at[:, dst_M].set(v[:, src_M])


def read_pages(k, v, pages_M):
    """[N, M, Z, K, X] contents of pages (swap out)."""
    return k[:, pages_M], v[:, pages_M]


def write_pages(k, v, pages_M, k_data, v_data):
    """Write page contents back (swap in); padding entries target the null page."""
    return k.at[:, pages_M].set(k_data.astype(k.dtype)), v.at[:, pages_M].set(
        v_data.astype(v.dtype)
    )


def pack_table(table_VD: jax.Array) -> dict:
    """Serving-side copies of the embedding table made once at start-up: a bfloat16 table as
    uint32 pairs, because XLA:CPU upcasts the whole table of a 16-bit gather to float32 first
    (65 MB written per step for a 32k x 512 table)."""
    if table_VD.dtype != jnp.bfloat16 or table_VD.shape[1] % 2:
        return {}
    V, D = table_VD.shape
    return {"embed_words": jax.lax.bitcast_convert_type(table_VD.reshape(V, D // 2, 2), jnp.uint32)}


def embed(model, tables: dict, tokens_T: jax.Array) -> jax.Array:
    """The model's token embeddings, from the packed table when there is one."""
    if "embed_table" in tables:  # the model's own table is packed as the output head
        return jnp.take(tables["embed_table"], tokens_T, axis=0).astype(model.cfg.compute_dtype)
    if "embed_words" not in tables:
        return model.embed_tokens(tokens_T)
    words_VW = constrain(tables["embed_words"], (None, None))
    x = jax.lax.bitcast_convert_type(jnp.take(words_VW, tokens_T, axis=0), jnp.bfloat16)
    return x.reshape(tokens_T.shape[0], -1).astype(model.cfg.compute_dtype)


def _sample_rows(logits_SV, b, prefix=""):
    return sample(
        logits_SV,
        b[prefix + "temperature"],
        b[prefix + "top_k"],
        b[prefix + "top_p"],
        b[prefix + "seed"],
        b[prefix + "seq_index"],
        b[prefix + "sample_pos"],
    )


def mixed_step(graphdef, kernel, params, tables, k, v, b):
    """D decode slots of L positions each, then Tp prefill tokens in R rows; samples after every
    decode position and after each row's last token -> (k, v, tokens, logprobs)."""
    model = nnx.merge(graphdef, params)
    k, v = copy_pages(k, v, b["copy_src"], b["copy_dst"])
    D, L = b["dec_tokens"].shape
    rows = b["pre_tokens"].shape[0] > 0

    def flat(name):
        return jnp.concatenate([b["dec_" + name].reshape(-1), b["pre_" + name]])

    ctx = PagedContext(
        k=k,
        v=v,
        positions_T=flat("pos"),
        write_page_T=flat("wpage"),
        write_offset_T=flat("woff"),
        dec_pages_DW=b["dec_pages"],
        dec_len_D=b["dec_len"],
        pre_index_RC=b["pre_index"] if rows else None,
        pre_pages_RW=b["pre_pages"] if rows else None,
        pre_len_R=b["pre_len"] if rows else None,
        kernel=kernel,
        dec_width=L,
    )
    x_TD, _ = model.forward(embed(model, tables, flat("tokens")), ctx)
    logits_SV = model.logits(x_TD[b["sample_index"]])
    tokens_S, logp_S = _sample_rows(logits_SV, b)
    return ctx.k, ctx.v, tokens_S, logp_S


def decode_slice(graphdef, kernel, page_size: int, slice_len: int, params, tables, k, v, b):
    """Up to `slice_len` decode iterations for D slots -> (k, v, tokens_SD, logp_SD, iters)."""
    model = nnx.merge(graphdef, params)
    k, v = copy_pages(k, v, b["copy_src"], b["copy_dst"])
    pages_DW = b["pages"]
    steps_D = b["steps"]  # tokens each slot may generate in this slice (0: padding slot)
    D = pages_DW.shape[0]

    def cond(c):
        return (c["i"] < slice_len) & ~jnp.all(c["done"])

    def body(c):
        pos_D, done_D = c["pos"], c["done"]
        page_D = jnp.take_along_axis(pages_DW, (pos_D // page_size)[:, None], axis=1)[:, 0]
        ctx = PagedContext(
            k=c["k"],
            v=c["v"],
            positions_T=pos_D,
            write_page_T=jnp.where(done_D, 0, page_D),
            write_offset_T=jnp.where(done_D, 0, pos_D % page_size),
            dec_pages_DW=pages_DW,
            dec_len_D=jnp.where(done_D, 0, pos_D + 1),
            kernel=kernel,
        )
        x_DD, _ = model.forward(embed(model, tables, c["tok"]), ctx)
        logits = model.logits(x_DD)
        nxt_D, logp_D = sample(
            logits, b["temperature"], b["top_k"], b["top_p"], b["seed"], b["seq_index"], pos_D + 1
        )
        count_D = c["count"] + (~done_D).astype(jnp.int32)
        stop_D = jnp.any(nxt_D[:, None] == b["stop_ids"], axis=-1)
        return {
            "k": ctx.k,
            "v": ctx.v,
            "tok": nxt_D,
            "pos": jnp.where(done_D, pos_D, pos_D + 1),
            "done": done_D | stop_D | (count_D >= steps_D),
            "count": count_D,
            "out_tok": c["out_tok"].at[c["i"]].set(nxt_D),
            "out_logp": c["out_logp"].at[c["i"]].set(logp_D),
            "i": c["i"] + 1,
        }

    init = {
        "k": k,
        "v": v,
        "tok": b["tokens"],
        "pos": b["positions"],
        "done": steps_D <= 0,
        "count": jnp.zeros((D,), jnp.int32),
        "out_tok": jnp.zeros((slice_len, D), jnp.int32),
        "out_logp": jnp.zeros((slice_len, D), jnp.float32),
        "i": jnp.zeros((), jnp.int32),
    }
    out = jax.lax.while_loop(cond, body, init)
    return out["k"], out["v"], out["out_tok"], out["out_logp"], out["i"]
