"""Tokenizers for the Llama 3 example.

The default is a byte-level BPE tokenizer trained in seconds on the Python standard library's own
source files (nothing to download) and cached. Users can instead load a ``tokenizers`` JSON file
or the tiktoken BPE file shipped with Meta's Llama 3 weights.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
import sysconfig
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# Bump when the default tokenizer's training recipe changes, so stale caches are not reused.
_RECIPE_VERSION = 1
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

# Llama 3's pre-tokenization regex and its 256 special tokens (ids follow the BPE ranks).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_NAMED = [
    BOS_TOKEN,
    EOS_TOKEN,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
# tiktoken's Rust regex recurses on very long runs; encoding in slices keeps it safe.
_TIKTOKEN_SLICE = 400_000


class Tokenizer(ABC):
    """Minimal tokenizer interface used by the data pipeline."""

    vocab_size: int
    bos_id: int
    eos_id: int
    fingerprint: str  # changes whenever the vocabulary does; keys token caches

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without bos/eos."""
        return [self.encode(t) for t in texts]


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from its JSON file."""

    def __init__(
        self, path: str | os.PathLike[str], bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN
    ) -> None:
        self.path = Path(path)
        data = self.path.read_bytes()
        self._tok = _tokenizers().Tokenizer.from_str(data.decode("utf-8"))
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(bos_token, "bos_token")
        self.eos_id = self._token_id(eos_token, "eos_token")

    def _token_id(self, token: str, arg: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"Tokenizer file {self.path} has no token {token!r}; pass {arg}= with the name of "
                "its begin/end-of-text token."
            )
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken BPE (the ``tokenizer.model`` file shipped with Meta's weights)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(
                f"Loading the tiktoken file {path} needs the tiktoken package; install the "
                "`llama` extra: pip install 'dream-trainer[llama]'."
            ) from e
        self.path = Path(path)
        data = self.path.read_bytes()
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"Line {n} of {self.path} is not '<base64 token> <rank>'; pass a tiktoken BPE "
                    "file (Llama 3's tokenizer.model) or a tokenizers .json file."
                ) from e
        names = _LLAMA3_NAMED + [
            f"<|reserved_special_token_{i}|>"
            for i in range(3, LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED) + 3)
        ]
        special = {name: len(ranks) + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=self.path.stem,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special,
        )
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.vocab_size = len(ranks) + len(special)
        self.bos_id = special[BOS_TOKEN]
        self.eos_id = special[EOS_TOKEN]

    def encode(self, text: str) -> list[int]:
        # Special-token strings inside training text are encoded as ordinary text.
        ids: list[int] = []
        for start in range(0, len(text), _TIKTOKEN_SLICE):
            piece = text[start : start + _TIKTOKEN_SLICE]
            ids.extend(self._enc.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "The Llama 3 example's BPE tokenizer needs the tokenizers package; install the "
            "`llama` extra: pip install 'dream-trainer[llama]'."
        ) from e
    return tokenizers


def cache_dir() -> Path:
    """``$DREAM_TRAINER_CACHE/llama3`` if the variable is set, else ``~/.cache/dream_trainer/llama3``."""
    root = os.environ.get("DREAM_TRAINER_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "dream_trainer"
    return base / "llama3"


def build_once(path: Path, build: Callable[[Path], object], timeout: float = 3600.0) -> Path:
    """Return ``path``, creating it with ``build(tmp_path)`` unless it exists.

    Safe when many ranks start at once: one process holds ``<path>.lock`` and builds into a
    temporary file that is atomically renamed into place; the others poll until it appears.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + timeout
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_is_stale(lock):
                lock.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise TimeoutError(
                    f"Waited {timeout:.0f}s for another process to build {path}; if no process is "
                    f"building it, delete the stale lock file {lock}."
                ) from None
            else:
                time.sleep(0.1)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            if not path.exists():
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                try:
                    build(tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
    return path


def _lock_is_stale(lock: Path) -> bool:
    """A lock is stale when its owner ran on this host and has exited."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):  # vanished, or its owner has not written it yet
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune, don't descend
        files.extend(Path(dirpath, n) for n in filenames if n.endswith(".py"))
    if not files:
        raise FileNotFoundError(
            f"Found no .py files under the standard library directory {root}; pass a tokenizer "
            "file to load_tokenizer() instead of training the default one."
        )
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    """File contents as text; undecodable bytes become U+FFFD so every file is usable."""
    return path.read_bytes().decode("utf-8", errors="replace")


def default_tokenizer(vocab_size: int = 2048, corpus_bytes: int = 4_000_000) -> BPETokenizer:
    """The byte-level BPE tokenizer trained on the first ``corpus_bytes`` of the stdlib sources.

    Trained once (about 2 s for 4 MB on one core) and cached under :func:`cache_dir`, keyed by
    the corpus contents, so every machine with the same Python builds the same vocabulary.
    """
    texts: list[str] = []
    digest = hashlib.sha256(f"v{_RECIPE_VERSION} vocab={vocab_size}".encode())
    total = 0
    for f in stdlib_files():
        data = f.read_bytes()
        texts.append(data.decode("utf-8", errors="replace"))
        digest.update(data)
        total += len(data)
        if total >= corpus_bytes:
            break
    name = f"stdlib-bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    path = build_once(cache_dir() / "tokenizers" / name, lambda tmp: _train(texts, vocab_size, tmp))
    return BPETokenizer(path)


def _train(texts: list[str], vocab_size: int, out: Path) -> None:
    hf = _tokenizers()
    decoders, models, pre_tokenizers, trainers = (
        hf.decoders,
        hf.models,
        hf.pre_tokenizers,
        hf.trainers,
    )
    tok = hf.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.write_text(tok.to_str())


def load_tokenizer(path: str | os.PathLike[str] | None = None, **kwargs: str) -> Tokenizer:
    """Load a tokenizer: None -> :func:`default_tokenizer`, ``*.json`` -> tokenizers, else tiktoken.

    ``kwargs`` (``bos_token``/``eos_token``) go to :class:`BPETokenizer` for JSON files.
    """
    if path is None:
        return default_tokenizer()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"Tokenizer file {p} does not exist; pass a tokenizers .json file, a tiktoken BPE "
            "file, or None for the default stdlib-trained tokenizer."
        )
    if p.suffix == ".json":
        return BPETokenizer(p, **kwargs)
    if kwargs:
        raise TypeError(
            f"Options {sorted(kwargs)} apply only to tokenizers .json files, not {p}; drop them."
        )
    return TiktokenTokenizer(p)


if __name__ == "__main__":  # python -m examples.llama3.tokenizer: build and time the default
    start = time.perf_counter()
    tok = default_tokenizer()
    print(
        f"{tok.path} vocab={tok.vocab_size} in {time.perf_counter() - start:.2f}s", file=sys.stderr
    )
