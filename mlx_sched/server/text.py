"""Text in and out of token ids: tokenizers, chat templates, incremental detokenization,
stop strings.

- `ByteTokenizerText`: the framework's own models (UTF-8 bytes are ids 0..255,
  `train.data.ByteTokenizer`).
- `HFTokenizer`: a Hugging Face folder's `tokenizer.json` (the `tokenizers` library),
  with the chat template, BOS and EOS of its `tokenizer_config.json` / `config.json`.
- `IncrementalDetokenizer`: streamed text that never splits a multi-byte character.
- `StopStrings`: text cut exactly before the first stop string, streamed.
- `write_byte_tokenizer`: a `tokenizer.json` (+ `tokenizer_config.json` with the plain chat
  template) for a framework model exported to a Hugging Face folder, so that `--hf_path`
  serves it with the same ids and text as `--checkpoint`.

The plain chat template (the byte-level models, and Hugging Face folders without a
template) renders each message as `"<role>: <content>\\n"` and then `"assistant:"`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from mlx_sched.train import data

REPLACEMENT = "\ufffd"
ROLES = ("system", "user", "assistant")


class TextError(ValueError):
    """Text cannot be tokenized, or a chat cannot be rendered; the message says why."""


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TextError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TextError(f"messages[{i}] must be an object with role and content")
        if m.get("role") not in ROLES:
            raise TextError(f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise TextError(f"messages[{i}].content must be a string")
    return messages


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def plain_chat(messages) -> str:
    """The documented plain template: one `role: content` line per message, then
    `assistant:`."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in check_messages(messages)) + (
        "assistant:"
    )


class Tokenizer:
    """What the server needs of a tokenizer."""

    name = "tokenizer"
    vocab_size: int
    eos_id: int | None = None
    bos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """A completion prompt's ids (with BOS when the tokenizer adds one)."""
        raise NotImplementedError

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A chat rendered with the template, then tokenized without adding specials again."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped; invalid UTF-8 as U+FFFD."""
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        """One token's text, for logprobs; bytes that are no text alone as `bytes:\\xNN`."""
        raise NotImplementedError


class ByteTokenizerText(Tokenizer):
    """The byte-level tokenizer of the framework's models; chat by the plain template."""

    name = "bytes"

    def __init__(self, vocab_size: int = data.VOCAB_SIZE):
        self.vocab_size = vocab_size
        self.eos_id, self.bos_id = data.EOS, data.BOS
        self._tok = data.ByteTokenizer()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._tok.encode(plain_chat(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    def token_text(self, token: int) -> str:
        if not 0 <= token < data.NUM_BYTE_TOKENS:
            return ""
        b = bytes([token])
        return b.decode("utf-8") if token < 0x80 else f"bytes:\\x{token:02x}"


def _special(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, with the folder's chat template, BOS and EOS."""

    name = "hf"

    def __init__(self, folder: str | pathlib.Path):
        import tokenizers

        folder = pathlib.Path(folder)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the library raises its own exception types
            raise TextError(f"{folder / 'tokenizer.json'} is not a readable tokenizer: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tc = _read_json(folder / "tokenizer_config.json")
        mc = _read_json(folder / "config.json")
        self.bos_token, self.eos_token = (
            _special(tc.get("bos_token")),
            _special(tc.get("eos_token")),
        )
        self.bos_id = self._id(self.bos_token, mc.get("bos_token_id"))
        self.eos_id = self._id(self.eos_token, mc.get("eos_token_id"))
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self._template = _compile(template) if isinstance(template, str) else None

    def _id(self, token: str | None, fallback) -> int | None:
        if token is not None and self._tok.token_to_id(token) is not None:
            return self._tok.token_to_id(token)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict]) -> str:
        if self._template is None:
            return plain_chat(messages)
        check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                add_generation_prompt=True,
            )
        except TextError:
            raise
        except Exception as e:  # jinja2 errors of a broken template
            raise TextError(f"the chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        text = self.decode([token])
        if REPLACEMENT not in text:
            return text
        piece = self._tok.id_to_token(token) or ""
        table = _byte_decoder()
        if piece and all(c in table for c in piece):  # a byte-level BPE piece
            return "bytes:" + "".join(f"\\x{table[c]:02x}" for c in piece)
        return piece


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), inverted."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def write_byte_tokenizer(folder: str | pathlib.Path) -> None:
    """Write the byte-level tokenizer of the framework's models into a Hugging Face folder
    (after `models.hf.save_model`): a byte-level BPE `tokenizer.json` with no merges whose id
    of byte b is b, PAD / BOS / EOS as special tokens at their ids, and a
    `tokenizer_config.json` carrying BOS, EOS and the plain chat template. Loaded by
    `HFTokenizer` (or `transformers`), it encodes and decodes as `ByteTokenizerText`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_char = {b: c for c, b in _byte_decoder().items()}
    specials = {"<pad>": data.PAD, "<s>": data.BOS, "</s>": data.EOS}
    level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for tok, i in specials.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {byte_char[b]: b for b in range(data.NUM_BYTE_TOKENS)},
            "merges": [],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": PLAIN_CHAT_TEMPLATE,
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TextError(f"{path} is not valid JSON: {e}") from e
    return out if isinstance(out, dict) else {}


def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TextError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except Exception as e:
        raise TextError(f"the chat template does not compile: {e}") from e


def load_tokenizer(hf_path: str | None, vocab_size: int) -> Tokenizer | None:
    """The tokenizer of a model: a Hugging Face folder's tokenizer.json (None if it ships
    none: token-id prompts only), or, for the framework's models (`hf_path=None`), the
    byte-level one when the vocabulary holds it."""
    if hf_path is None:
        return ByteTokenizerText(vocab_size) if vocab_size >= data.EOS + 1 else None
    if not (pathlib.Path(hf_path) / "tokenizer.json").is_file():
        return None
    tok = HFTokenizer(hf_path)
    if tok.vocab_size > vocab_size:
        raise TextError(
            f"{hf_path}/tokenizer.json has {tok.vocab_size} tokens, more than the model's "
            f"vocabulary of {vocab_size}"
        )
    return tok


class IncrementalDetokenizer:
    """Text of a growing id sequence, piece by piece, never splitting a character: decode a
    short window (from `prefix` to the end) and emit what it adds to the window's text up to
    `read`, holding back while the new text ends in U+FFFD (an incomplete character), as
    vLLM does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; end of what was emitted

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return new


class StopStrings:
    """Stream text cut exactly before the first stop string: `push` returns what is safe to
    emit (holding back a tail that may begin a stop string) and whether a stop was found."""

    MAX = 4

    def __init__(self, stops: Sequence[str]):
        stops = list(stops)
        if len(stops) > self.MAX:
            raise TextError(f"at most {self.MAX} stop strings, got {len(stops)}")
        if any(not isinstance(s, str) or not s for s in stops):
            raise TextError("stop strings must be non-empty strings")
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out, True
        keep = min(self.hold, len(self.buf))
        # hold back only a tail that could start a stop string
        while keep and not any(s.startswith(self.buf[len(self.buf) - keep :]) for s in self.stops):
            keep -= 1
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out
