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

from mlx_sched.serve.sampling import chosen_logprob, row_keys, sample, sample_with_probs
from mlx_sched.speculative.acceptance import ancestors, verify_chain, verify_tree
from models.lora_pool import SlotSegments, step_adapters
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
    decode position and after each row's last token, and with L > 1 decides which drafts each
    slot keeps -> (k, v, tokens, logprobs, accepted drafts per slot)."""
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
        lora_slots=step_adapters(model, k, v, b, _lora_segments(b, L, rows)),  # S-LoRA
    )
    tree = "dec_parent" in b and L > 1 and D > 0  # token trees (SpecInfer)
    if tree:
        ctx.dec_tree_DLL, ctx.dec_base_D = ancestors(b["dec_parent"]), b["dec_base"]
    x_TD, _ = model.forward(embed(model, tables, flat("tokens")), ctx)
    logits_SV = model.logits(x_TD[b["sample_index"]])
    tokens_S, _ = _sample_rows(logits_SV, b)
    accepted_D = jnp.zeros((D,), jnp.int32)
    k, v = ctx.k, ctx.v
    if tree:
        tokens_S, accepted_D, path_DL = _verify(logits_SV, tokens_S, b, D, L, tree=True)
        k, v = compact_path(k, v, b["dec_pages"], b["dec_base"], path_DL, accepted_D)
    elif L > 1 and D:  # verification: decide on device which drafts the slots keep
        tokens_S, accepted_D = _verify(logits_SV, tokens_S, b, D, L)
    return k, v, tokens_S, chosen_logprob(logits_SV, tokens_S), accepted_D


def _lora_segments(b, L: int, rows: bool):
    """The mixed step's adapter slots by segment: a decode slot's L tokens, a prefill row."""
    if "dec_slot" not in b:
        return None
    pre = (b["pre_slot"], b["pre_index"]) if rows else (None, None)
    return SlotSegments(b["dec_slot"], L, *pre)


def compact_path(k, v, pages_DW, base_D, path_DL, accepted_D):
    """Move the K/V of each slot's accepted tree nodes to the positions of their depths
    (node path[i], written at base + path[i], goes to base + i); all reads before writes.
    Unmoved entries copy the null page onto itself."""
    D, L = path_DL.shape
    Z = k.shape[2]
    i_L = jnp.arange(L)[None, :]
    src_DL, dst_DL = base_D[:, None] + path_DL, base_D[:, None] + i_L
    move = (i_L >= 1) & (i_L <= accepted_D[:, None]) & (src_DL != dst_DL)

    def at(pos_DL):
        page = jnp.take_along_axis(pages_DW, pos_DL // Z, axis=1)
        return jnp.where(move, page, 0).reshape(-1), jnp.where(move, pos_DL % Z, 0).reshape(-1)

    (sp, so), (dp, do) = at(src_DL), at(dst_DL)
    return k.at[:, dp, do].set(k[:, sp, so]), v.at[:, dp, do].set(v[:, sp, so])


def _verify(logits_SV, tokens_S, b, D, L, tree=False):
    """Acceptance of each decode slot's drafts (`speculative.acceptance`): the slots' rows get
    their kept tokens; -> (tokens_S, accepted_D), and each slot's path with a tree."""
    n = D * L
    q = b.get("dec_q")  # the draft's distributions: Leviathan's rejection rule
    keys = None
    if q is not None:
        keys = row_keys(b["seed"][:n], b["seq_index"][:n], b["sample_pos"][:n]).reshape(D, L)
    per_slot = {name: b[name][:n:L] for name in ("temperature", "top_k", "top_p")}
    if tree:
        tok_DL, accepted_D, path_DL = verify_tree(
            logits_SV[:n].reshape(D, L, -1),
            tokens_S[:n].reshape(D, L),
            b["dec_tokens"],
            b["dec_parent"],
            per_slot,
            keys,
            q,
        )
        return tokens_S.at[:n].set(tok_DL.reshape(-1)), accepted_D, path_DL
    tok_DL, accepted_D = verify_chain(
        logits_SV[:n].reshape(D, L, -1),
        tokens_S[:n].reshape(D, L),
        b["dec_tokens"][:, 1:],
        b["dec_ndraft"],
        per_slot,
        keys,
        q,
    )
    return tokens_S.at[:n].set(tok_DL.reshape(-1)), accepted_D


def decode_slice(
    graphdef, kernel, page_size: int, slice_len: int, params, tables, k, v, b, probs=False
):
    """Up to `slice_len` decode iterations for D slots -> (k, v, tokens_SD, logp_SD, iters);
    with `probs` (a draft model's slice) also each sampled token's distribution, q_SDV."""
    model = nnx.merge(graphdef, params)
    k, v = copy_pages(k, v, b["copy_src"], b["copy_dst"])
    pages_DW = b["pages"]
    steps_D = b["steps"]  # tokens each slot may generate in this slice (0: padding slot)
    D = pages_DW.shape[0]
    adapters = step_adapters(model, k, v, b, b.get("slot"))  # S-LoRA: read once per slice

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
            lora_slots=adapters,
        )
        x_DD, _ = model.forward(embed(model, tables, c["tok"]), ctx)
        logits = model.logits(x_DD)
        rows = (b["temperature"], b["top_k"], b["top_p"], b["seed"], b["seq_index"], pos_D + 1)
        if probs:
            nxt_D, logp_D, q_DV = sample_with_probs(logits, *rows)
        else:
            nxt_D, logp_D = sample(logits, *rows)
        count_D = c["count"] + (~done_D).astype(jnp.int32)
        stop_D = jnp.any(nxt_D[:, None] == b["stop_ids"], axis=-1)
        out = {
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
        if probs:
            out["out_q"] = c["out_q"].at[c["i"]].set(q_DV)
        return out

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
    if probs:
        init["out_q"] = jnp.zeros((slice_len, D, model.cfg.vocab_size), jnp.float32)
    out = jax.lax.while_loop(cond, body, init)
    if probs:
        return out["k"], out["v"], out["out_tok"], out["out_logp"], out["i"], out["out_q"]
    return out["k"], out["v"], out["out_tok"], out["out_logp"], out["i"]
