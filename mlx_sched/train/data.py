"""Byte-level text data: the embedded corpus, held-out split, deterministic resumable batches.

The default corpus is real text present on every machine: the running
interpreter's standard-library source files. Token ids 0..255 are bytes;
a few special ids follow.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import zlib

import numpy as np

PAD, BOS, EOS = 256, 257, 258
NUM_BYTE_TOKENS = 256
VOCAB_SIZE = 264  # 259 used ids, padded to a multiple of 8 for sharding


class DataError(ValueError):
    """The data path is missing, empty, or too small; the message says what to fix."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus PAD, BOS and EOS."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < NUM_BYTE_TOKENS).decode(
            "utf-8", errors="replace"
        )


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint16 token stream, documents separated by EOS
    heldout: np.ndarray
    source: str
    num_docs: int


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    files = [p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _read_text(path: pathlib.Path) -> bytes | None:
    """File bytes, or None for binary files (NUL bytes or invalid UTF-8)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def _stream(docs: list[bytes]) -> np.ndarray:
    if not docs:
        return np.zeros(0, np.uint16)
    parts = []
    for d in docs:
        parts.append(np.frombuffer(d, np.uint8).astype(np.uint16))
        parts.append(np.array([EOS], np.uint16))
    return np.concatenate(parts)


def load_corpus(path: str | None = None, heldout_fraction: float = 0.02) -> Corpus:
    """Load the default corpus (stdlib sources) or any text file / folder of text files.

    Folders are split by file (a file is held out by a hash of its relative
    path); a single file is split by its tail.
    """
    if not 0.0 < heldout_fraction < 0.5:
        raise DataError(f"data.heldout_fraction must be in (0, 0.5), got {heldout_fraction}")
    if path in (None, ""):
        root, files, source = stdlib_root(), None, "stdlib"
        files = _text_files(root, "*.py")
    else:
        root = pathlib.Path(path).expanduser()
        source = str(root)
        if not root.exists():
            raise DataError(
                f"data path '{path}' does not exist; pass --config.data.path=<text file or "
                "folder>, or leave it empty for the built-in corpus"
            )
        files = [root] if root.is_file() else _text_files(root, "*")
    docs = {f: d for f in files if (d := _read_text(f))}
    if not docs or sum(len(d) for d in docs.values()) == 0:
        raise DataError(f"data path '{source}' holds no text (empty, or only binary files)")
    if len(docs) == 1:
        (only,) = docs.values()
        cut = int(len(only) * (1 - heldout_fraction))
        train, held = _stream([only[:cut]]), _stream([only[cut:]])
    else:
        bucket = int(round(1 / heldout_fraction))
        base = root if root.is_dir() else root.parent
        held_files = [
            f for f in docs if zlib.crc32(str(f.relative_to(base)).encode()) % bucket == 0
        ]
        if not held_files:  # tiny folders: hold out the last file
            held_files = [list(docs)[-1]]
        held_set = set(held_files)
        train = _stream([d for f, d in docs.items() if f not in held_set])
        held = _stream([docs[f] for f in held_files])
    return Corpus(train=train, heldout=held, source=source, num_docs=len(docs))


class Batcher:
    """Deterministic, resumable batches of windows [B, L + 1] from a token stream.

    The stream is cut into non-overlapping windows; each epoch visits them in a
    permutation seeded by (seed, epoch). Batch `i` is a pure function of
    (stream, seed, i), so resuming needs only the batch index. In a
    multi-process run each process reads its own rows of the global batch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise DataError(
                f"train.batch_size must be a multiple of the {process_count} processes, "
                f"got {batch_size}"
            )
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < batch_size:
            raise DataError(
                f"the corpus has {len(tokens)} tokens: only {self.num_windows} windows of "
                f"seq_len={seq_len}, fewer than batch_size={batch_size}; use more text "
                "(data.path) or a smaller train.batch_size or train.seq_len"
            )
        self.per_epoch = self.num_windows // batch_size
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        return self._perm

    def batch(self, index: int) -> np.ndarray:
        """Local rows of global batch `index`: int32 [B / processes, L + 1]."""
        epoch, k = divmod(index, self.per_epoch)
        windows = self._permutation(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        starts = windows[self.rows] * self.seq_len
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return self.tokens[idx].astype(np.int32)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int):
    """The first `num_batches` full batches of consecutive windows of the held-out stream."""
    if num_batches < 1:
        raise DataError(f"train.eval_batches must be > 0, got {num_batches}")
    n = min(num_batches, ((len(tokens) - 1) // seq_len) // batch_size)
    if n == 0:
        raise DataError(
            f"held-out split has {len(tokens)} tokens, too few for one batch of "
            f"train.batch_size x train.seq_len = {batch_size} x {seq_len}; use more text "
            "(data.path), a larger data.heldout_fraction, or a smaller batch_size or seq_len"
        )
    out = []
    for b in range(n):
        starts = (b * batch_size + np.arange(batch_size)) * seq_len
        out.append(tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32))
    return out
