"""Text in and out of the server: the byte-level and Hugging Face tokenizers, chat
templates, incremental detokenization (never a split character) and stop strings.

Hugging Face tokenizers are built here (no download): the framework's byte tokenizer
written as a `tokenizer.json` by `write_byte_tokenizer`, and a byte-level BPE with merges
trained on generated text by the `tokenizers` trainer.
"""

from __future__ import annotations

import json

import openai
import pytest
import tokenizers
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.server import text as text_lib
from mlx_sched.server.app import App, Server, ServerSettings
from mlx_sched.train import data
from models import ModelConfig, Transformer, hf

TEXTS = [
    "def main():\n    return 0\n",
    "naïve café — 中文 and emoji 🙂🚀 done",
    "",
    "  leading spaces and\ttabs\n\n",
]
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello — 🙂"},
]


@pytest.fixture(scope="module")
def byte_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("byte_tok")
    text_lib.write_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE with merges (multi-byte characters become single tokens, and some
    tokens end in the middle of a character), trained on generated text."""
    folder = tmp_path_factory.mktemp("bpe_tok")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [t * 20 for t in TEXTS] + ["café 中文中文 🙂🙂 naïve"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template}
        )
    )
    return folder


# -- the byte tokenizer as tokenizer.json ------------------------------------------------------


def test_written_byte_tokenizer_encodes_and_decodes_as_the_byte_tokenizer(byte_folder):
    ours = text_lib.ByteTokenizerText()
    theirs = text_lib.HFTokenizer(byte_folder)
    assert (theirs.bos_id, theirs.eos_id) == (data.BOS, data.EOS)
    assert theirs.vocab_size == data.EOS + 1
    for t in TEXTS:
        assert theirs.encode(t) == ours.encode(t) == list(t.encode("utf-8"))
        assert theirs.decode(ours.encode(t)) == t
    # special tokens are skipped in decoded text on both sides
    ids = [data.BOS, *ours.encode("ab"), data.EOS]
    assert theirs.decode(ids) == ours.decode(ids) == "ab"
    assert theirs.encode_chat(MESSAGES) == ours.encode_chat(MESSAGES)
    assert theirs.render_chat(MESSAGES) == text_lib.plain_chat(MESSAGES)


def test_written_byte_tokenizer_loads_in_transformers(byte_folder):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(byte_folder))
    for t in TEXTS:
        assert tok(t)["input_ids"] == list(t.encode("utf-8"))
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == text_lib.plain_chat(MESSAGES)
    assert tok.eos_token_id == data.EOS


def test_token_text_of_bytes_that_are_no_text_alone(byte_folder):
    hf_tok, ours = text_lib.HFTokenizer(byte_folder), text_lib.ByteTokenizerText()
    for tok in (hf_tok, ours):
        assert tok.token_text(ord("a")) == "a"
        assert tok.token_text(0xC3) == "bytes:\\xc3"  # the first byte of 'é'


# -- incremental detokenization ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["bytes", "byte_folder", "bpe_folder"])
def test_streamed_pieces_never_split_a_character(which, request):
    tok = (
        text_lib.ByteTokenizerText()
        if which == "bytes"
        else text_lib.HFTokenizer(request.getfixturevalue(which))
    )
    for t in [*TEXTS, "🎉 party 🎉"]:
        ids = tok._tok.encode(t, add_special_tokens=False).ids if which == "bpe_folder" else None
        ids = ids if ids is not None else tok.encode(t)
        for step in (1, 2, 3):
            detok = text_lib.IncrementalDetokenizer(tok)
            pieces = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
            pieces.append(detok.flush())
            assert text_lib.REPLACEMENT not in "".join(pieces)
            assert "".join(pieces) == tok.decode(ids) == t


def test_bpe_with_merges_has_tokens_inside_a_character(bpe_folder):
    """The trained tokenizer is a real test of the detokenizer: some text needs pieces held
    back (a token alone decodes to U+FFFD) and some tokens hold a whole multi-byte char."""
    tok = text_lib.HFTokenizer(bpe_folder)
    ids = tok.encode("🎉")  # not in the corpus: byte pieces, none a character alone
    alone = [tok.decode([i]) for i in ids]
    assert all(text_lib.REPLACEMENT in a for a in alone)
    assert all(tok.token_text(i).startswith("bytes:\\x") for i in ids)
    assert tok.encode("🙂") != list("🙂".encode())  # a whole emoji merged into one token
    assert len(tok.encode("中文")) < len("中文".encode())


def test_an_incomplete_character_is_held_back_then_flushed_as_replacement():
    tok = text_lib.ByteTokenizerText()
    detok = text_lib.IncrementalDetokenizer(tok)
    assert detok.push([ord("a"), 0xC3]) == ""  # held: the new text ends inside 'é'
    assert detok.push([0xA9, ord("b")]) == "aéb"
    assert detok.push([0xC3]) == ""
    assert detok.flush() == text_lib.REPLACEMENT  # the stream ended inside a character
    assert detok.flush() == ""


# -- chat templates ----------------------------------------------------------------------------


def test_checkpoint_chat_template_with_bos_eos_and_its_refusals(bpe_folder):
    tok = text_lib.HFTokenizer(bpe_folder)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.render_chat(msgs) == "<s>[user] hi</s>[assistant] yo</s>[assistant] "
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2  # specials not added twice
    with pytest.raises(text_lib.TextError, match="refused the messages: no system messages"):
        tok.render_chat(MESSAGES)
    with pytest.raises(text_lib.TextError, match=r"messages\[0\].role"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def test_broken_folders_are_clear_errors(tmp_path, bpe_folder):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(text_lib.TextError, match="not a readable tokenizer"):
        text_lib.HFTokenizer(tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    (good / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    (good / "tokenizer_config.json").write_text('{"chat_template": "{% for %}"}')
    with pytest.raises(text_lib.TextError, match="does not compile"):
        text_lib.HFTokenizer(good)
    (good / "tokenizer_config.json").write_text("[1,")
    with pytest.raises(text_lib.TextError, match="not valid JSON"):
        text_lib.HFTokenizer(good)


def test_load_tokenizer_choices(tmp_path, bpe_folder):
    assert isinstance(text_lib.load_tokenizer(None, 264), text_lib.ByteTokenizerText)
    assert text_lib.load_tokenizer(None, 128) is None  # no room for the byte ids
    assert text_lib.load_tokenizer(str(tmp_path), 512) is None  # no tokenizer.json
    assert isinstance(text_lib.load_tokenizer(str(bpe_folder), 512), text_lib.HFTokenizer)
    with pytest.raises(text_lib.TextError, match="more than the model's vocabulary of 100"):
        text_lib.load_tokenizer(str(bpe_folder), 100)


# -- stop strings ------------------------------------------------------------------------------


def stream_stops(stops, pieces):
    s = text_lib.StopStrings(stops)
    out, stopped = [], False
    for p in pieces:
        got, stopped = s.push(p)
        out.append(got)
        if stopped:
            break
    if not stopped:
        out.append(s.flush())
    return "".join(out), stopped


@pytest.mark.parametrize(
    "stops,pieces,want",
    [
        (["\n\n"], ["ab\n", "\ncd"], ("ab", True)),  # a stop across two pieces
        (["END"], ["xE", "N", "Dy"], ("x", True)),
        (["END"], ["xEN", "Q"], ("xENQ", False)),  # a false start is emitted after all
        (["b", "abc"], ["zab"], ("za", True)),  # the earliest match wins
        ([], ["abc"], ("abc", False)),
        (["é"], ["caf", "é!"], ("caf", True)),
    ],
)
def test_stop_strings_cut_exactly_before_the_first_match(stops, pieces, want):
    assert stream_stops(stops, pieces) == want


def test_stop_strings_hold_back_only_a_possible_prefix():
    s = text_lib.StopStrings(["xyz"])
    assert s.push("abcx") == ("abc", False)  # 'x' may begin 'xyz'
    assert s.push("q") == ("xq", False)
    assert s.flush() == ""


def test_stop_strings_refusals():
    with pytest.raises(text_lib.TextError, match="at most 4"):
        text_lib.StopStrings(["a", "b", "c", "d", "e"])
    with pytest.raises(text_lib.TextError, match="non-empty strings"):
        text_lib.StopStrings([""])


# -- a framework model exported to a Hugging Face folder serves the same text ----------------


def test_exported_model_serves_the_same_text_through_its_tokenizer_json(tmp_path):
    cfg = ModelConfig(
        vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128
    )
    model = Transformer(cfg, nnx.Rngs(3))
    folder = tmp_path / "hf"
    hf.save_model(model, folder)
    text_lib.write_byte_tokenizer(folder)
    loaded = hf.load_model(str(folder))
    tok = text_lib.load_tokenizer(str(folder), loaded.cfg.vocab_size)
    assert isinstance(tok, text_lib.HFTokenizer)
    serve = ServeConfig(page_size=16, num_pages=64, max_seqs=4, token_budget=64, eos_token=data.EOS)
    answers = []
    for m, t in ((model, text_lib.ByteTokenizerText()), (loaded, tok)):
        app = App(Engine(m, serve), t, ServerSettings(model_name="m"))
        server = Server(app, "127.0.0.1", 0, log_level="warning").start_thread()
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            answers.append(
                [
                    client.completions.create(
                        model="m", prompt="héllo ", max_tokens=16, temperature=0
                    )
                    .choices[0]
                    .text,
                    client.chat.completions.create(
                        model="m", messages=MESSAGES, max_tokens=16, temperature=0
                    )
                    .choices[0]
                    .message.content,
                ]
            )
        finally:
            server.stop()
    assert answers[0] == answers[1]
