"""One HTTP completion's life: its prompts become engine requests, the engine's events
become choices (text detokenized incrementally, cut exactly at a stop string, logprobs,
usage), answered whole or streamed as OpenAI's server-sent-event chunks.

A request with k prompts and `n` samples is k engine requests of n sequences each;
choice `i * n + j` is sequence j of prompt i, as in the OpenAI API. A stop string is
matched on the detokenized text; once every sequence of an engine request has met
one (or ended), the request is aborted in the engine so its pages are freed at once.
`delivery.py` drives a `Generation` from a request handler.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any

from mlx_sched.serve.request import RequestError, SamplingParams
from mlx_sched.server import text as text_lib
from mlx_sched.server.engine_thread import (
    Delta,
    Submission,
)
from mlx_sched.server.protocol import ApiError, ChatRequest, CompletionRequest

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclasses.dataclass
class Limits:
    """What the server refuses before the engine sees a request."""

    max_len: int  # context length: prompt + max_tokens
    vocab_size: int
    max_n: int = 8


class Choice:
    """One sequence of one prompt: its tokens, text and how it ended."""

    def __init__(self, index: int, tokenizer, stops: list[str], want_logprobs: bool):
        self.index = index
        self.tokenizer = tokenizer
        self.detok = text_lib.IncrementalDetokenizer(tokenizer) if tokenizer else None
        self.stops = text_lib.StopStrings(stops) if stops else None
        self.want_logprobs = want_logprobs
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, tokens: list[int], logprobs: list[float] | None) -> tuple[str, int]:
        """Take a step's tokens; returns the text to emit and how many tokens were kept. With
        stop strings one token at a time (a stop may end inside the step: the tokens after it
        are not kept); without, the step's tokens in one piece."""
        if self.done or not tokens:
            return "", 0
        if self.stops is not None:
            out, kept = [], 0
            for kept, tok in enumerate(tokens, 1):  # noqa: B007 (kept is used after the loop)
                out.append(self._cut(self.detok.push([tok])))
                if self.done:
                    break
        else:
            kept = len(tokens)
            out = [self._cut(self.detok.push(tokens) if self.detok else "")]
        self.token_ids += tokens[:kept]
        if self.want_logprobs and logprobs is not None:
            self.logprobs += [float(x) for x in logprobs[:kept]]
        return "".join(out), kept

    def finish(self, reason: str | None) -> str:
        """The engine ended this sequence: release held-back text; returns it."""
        if self.done:
            return ""
        tail = self._cut(self.detok.flush() if self.detok else "")
        if not self.done and self.stops is not None:
            tail += self.stops.flush()
        if not self.done:
            self.finish_reason = FINISH_REASONS.get(reason or "abort", "stop")
        self.text += tail
        return tail

    def _cut(self, piece: str) -> str:
        if self.stops is None:
            self.text += piece
            return piece
        emit, stopped = self.stops.push(piece)
        self.text += emit
        if stopped:
            self.finish_reason = "stop"
        return emit

    def token_strings(self) -> list[str]:
        tok = self.tokenizer
        return [tok.token_text(t) if tok else str(t) for t in self.token_ids]


class Generation:
    """The engine requests and choices of one HTTP completion request."""

    def __init__(
        self,
        body: CompletionRequest | ChatRequest,
        prompts: list[list[int]],
        tokenizer,
        limits: Limits,
        model_name: str,
    ):
        self.body, self.tokenizer, self.model_name = body, tokenizer, model_name
        self.chat = isinstance(body, ChatRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        n = body.n
        if n > limits.max_n:
            raise ApiError(400, f"n must be at most {limits.max_n}, got {n}", param="n")
        if body.stops and tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer; this model has none", "stop")
        # completions: logprobs=0 asks for the chosen tokens' (OpenAI); chat: logprobs=true
        want_lp = self.want_logprobs = body.logprobs is not None and body.logprobs is not False
        self.rids = [f"{self.id}-{i}" for i in range(len(prompts))]
        self.choices = {
            rid: [Choice(i * n + j, tokenizer, body.stops, want_lp) for j in range(n)]
            for i, rid in enumerate(self.rids)
        }
        self.ended: set[str] = set()  # engine requests finished or aborted
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        self.submissions = []
        for rid, prompt in zip(self.rids, prompts, strict=True):
            max_tokens = self._max_tokens(prompt, limits)
            try:
                sampling = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    n=n,
                    seed=seed,
                    ignore_eos=body.ignore_eos,
                    logprobs=want_lp,
                )
            except RequestError as e:
                raise ApiError(400, str(e)) from None
            self.submissions.append(
                Submission(rid, prompt, sampling, body.user or "default", body.priority)
            )

    def _max_tokens(self, prompt: list[int], limits: Limits) -> int:
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"token ids outside the vocabulary [0, {limits.vocab_size}): {bad[:5]}",
                param="prompt" if not self.chat else "messages",
            )
        room = limits.max_len - len(prompt)
        which = "messages" if self.chat else "prompt"
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; the context length is {limits.max_len}",
                param=which,
                code="context_length_exceeded",
            )
        asked = self.body.token_limit if self.chat else self.body.max_tokens
        if asked is None:
            return room
        if asked > room:
            raise ApiError(
                400,
                f"max_tokens ({asked}) + the prompt ({len(prompt)} tokens) exceeds the context "
                f"length {limits.max_len}",
                param="max_completion_tokens"
                if self.chat and self.body.max_completion_tokens
                else "max_tokens",
                code="context_length_exceeded",
            )
        return asked

    # -- events -----------------------------------------------------------------------

    def on_delta(self, d: Delta) -> tuple[list[tuple[Choice, str, int]], bool]:
        """Apply one Delta: per choice touched, (choice, new text, new tokens); and whether the
        engine request should now be aborted (every sequence met a stop string)."""
        news = []
        choices = self.choices[d.request_id]
        for j, choice in enumerate(choices):
            if choice.done:
                continue
            toks = d.tokens[j] if j < len(d.tokens) else []
            lps = d.logprobs[j] if d.logprobs is not None and j < len(d.logprobs) else None
            emitted, kept = choice.feed(toks, lps)
            if d.finished:
                reasons = d.finish_reasons
                emitted += choice.finish(reasons[j] if j < len(reasons) else "abort")
            if emitted or kept or choice.done:
                news.append((choice, emitted, kept))
        if d.finished:
            self.ended.add(d.request_id)
        abort = not d.finished and all(c.done for c in choices)
        if abort:
            self.ended.add(d.request_id)
        return news, abort

    @property
    def finished(self) -> bool:
        return len(self.ended) == len(self.rids)

    def all_choices(self) -> list[Choice]:
        return sorted((c for cs in self.choices.values() for c in cs), key=lambda c: c.index)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.all_choices())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # -- OpenAI objects -------------------------------------------------------------------

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    @property
    def wants_tokens(self) -> bool:
        """Every token matters to the client (token ids or logprobs), not only the text."""
        return bool(self.body.return_token_ids or self.tokenizer is None or self.want_logprobs)

    def _token_ids(self, choice: Choice, since: int = 0) -> dict:
        if self.body.return_token_ids or self.tokenizer is None:
            return {"token_ids": choice.token_ids[since:]}
        return {}

    def _logprobs(self, choice: Choice, since: int = 0, offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        strings = choice.token_strings()[since:]
        lps = choice.logprobs[since:]
        if self.chat:
            return {
                "content": [
                    {
                        "token": s,
                        "logprob": lp,
                        "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [],
                    }
                    for s, lp in zip(strings, lps, strict=False)
                ]
            }
        offsets, pos = [], offset
        for s in strings:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": strings,
            "token_logprobs": lps,
            "top_logprobs": None,
            "text_offset": offsets,
        }

    def response(self) -> dict:
        choices = []
        for c in self.all_choices():
            if self.chat:
                item = {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c),
                    "finish_reason": c.finish_reason,
                }
            else:
                item = {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": self._logprobs(c),
                    "finish_reason": c.finish_reason,
                }
            choices.append(item | self._token_ids(c))
        obj = "chat.completion" if self.chat else "text_completion"
        return self._head(obj) | {"choices": choices, "usage": self.usage()}

    def chunk(self, choice: Choice, text: str, kept: int, first: bool) -> dict:
        since = len(choice.token_ids) - kept
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or not choice.done:
                delta["content"] = text
            item = {"index": choice.index, "delta": delta}
        else:
            item = {"index": choice.index, "text": text}
        offset = len(choice.text) - len(text)
        item |= {
            "logprobs": self._logprobs(choice, since, offset),
            "finish_reason": choice.finish_reason,
        }
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [item | self._token_ids(choice, since)]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": self.usage()}
