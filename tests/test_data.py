"""Corpus loading, held-out split, deterministic resumable batches, bad data paths."""

import numpy as np
import pytest

from mlx_sched.train import data


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus()


def test_default_corpus_is_stdlib_bytes(corpus):
    assert corpus.source == "stdlib"
    assert corpus.num_docs > 100
    assert len(corpus.train) > 1_000_000 and len(corpus.heldout) > 10_000
    assert corpus.train.max() <= data.EOS and corpus.heldout.max() <= data.EOS
    text = data.ByteTokenizer().decode(corpus.train[:5000])
    assert "import" in text or "def " in text


def test_heldout_files_are_disjoint_from_train(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"document number {i} " * 20)
    c = data.load_corpus(str(tmp_path), heldout_fraction=0.1)
    tok = data.ByteTokenizer()
    train_text, held_text = tok.decode(c.train), tok.decode(c.heldout)
    assert c.num_docs == 60
    assert 0 < len(c.heldout) < len(c.train)
    for i in range(60):
        doc = f"document number {i} "
        assert (doc in held_text) != (doc in train_text), i


def test_single_file_split_by_tail(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("abcdefghij" * 1000)
    c = data.load_corpus(str(f), heldout_fraction=0.1)
    assert len(c.heldout) == 1001 and len(c.train) == 9001


def test_tokenizer_round_trip_utf8():
    tok = data.ByteTokenizer()
    s = "héllo, wörld → ✓"
    ids = tok.encode(s, bos=True)
    assert ids[0] == data.BOS and max(ids[1:]) < 256
    assert tok.decode(ids) == s


def test_batches_are_deterministic_and_resumable(corpus):
    a = data.Batcher(corpus.train, 4, 32, seed=3)
    b = data.Batcher(corpus.train, 4, 32, seed=3)
    seq = [a.batch(i) for i in range(5)]
    # a fresh batcher that starts at position 3 (a resume) continues identically
    np.testing.assert_array_equal(b.batch(3), seq[3])
    np.testing.assert_array_equal(b.batch(4), seq[4])
    assert seq[0].shape == (4, 33) and seq[0].dtype == np.int32
    assert not np.array_equal(seq[0], seq[1])
    c = data.Batcher(corpus.train, 4, 32, seed=4)
    assert not np.array_equal(c.batch(0), seq[0])


def test_epochs_visit_every_window_once():
    tokens = np.arange(1 + 8 * 10, dtype=np.uint16)
    b = data.Batcher(tokens, 2, 10, seed=0)
    starts = sorted(int(b.batch(i)[r, 0]) for i in range(b.per_epoch) for r in range(2))
    assert starts == [10 * w for w in range(8)]
    assert not np.array_equal(b.batch(0), b.batch(b.per_epoch))  # next epoch reshuffles


def test_process_rows_partition_the_global_batch(corpus):
    whole = data.Batcher(corpus.train, 8, 16, seed=1).batch(7)
    parts = [
        data.Batcher(corpus.train, 8, 16, seed=1, process_index=p, process_count=2) for p in (0, 1)
    ]
    np.testing.assert_array_equal(np.concatenate([p.batch(7) for p in parts]), whole)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_corpus(str(tmp_path / "nope"))


def test_empty_folder_or_binary_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="holds no text"):
        data.load_corpus(str(tmp_path))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="holds no text"):
        data.load_corpus(str(tmp_path))


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(data.DataError, match="fewer than batch_size"):
        data.Batcher(np.zeros(100, np.uint16), 8, 64)
    with pytest.raises(data.DataError, match="too few for one batch"):
        data.eval_batches(np.zeros(100, np.uint16), 8, 64, 2)


def test_data_errors_name_the_cause_and_settings_that_exist():
    tokens = np.arange(10_000, dtype=np.uint16)
    # zero eval batches is that setting's mistake, not a held-out split too small
    with pytest.raises(data.DataError, match=r"^train.eval_batches must be > 0, got 0$"):
        data.eval_batches(tokens, 2, 8, 0)
    with pytest.raises(data.DataError) as e:
        data.eval_batches(tokens[:100], 8, 64, 4)
    hint = str(e.value)
    for setting in ("data.path", "data.heldout_fraction", "batch_size", "seq_len"):
        assert setting in hint
    assert "eval batch" not in hint  # no such setting
    with pytest.raises(data.DataError, match="train.batch_size must be a multiple of the 2"):
        data.Batcher(tokens, 3, 8, process_count=2)
    with pytest.raises(data.DataError, match=r"data.heldout_fraction must be in \(0, 0.5\)"):
        data.load_corpus(None, heldout_fraction=0.7)
