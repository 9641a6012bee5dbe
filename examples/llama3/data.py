"""Text sources, token packing and resumable per-rank data loaders for the Llama 3 example.

Documents are tokenized once as ``[bos] + tokens + [eos]`` into one flat stream cached as a
``.bin`` file of uint16/uint32 ids, then cut into non-overlapping chunks of ``seq_len + 1``
tokens: ``input_ids = chunk[:-1]``, ``labels = chunk[1:]``. A DistributedSampler gives every data
parallel rank a disjoint, equally sized share of the chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from dream_trainer.trainer import GlobalOrderSampler
from examples.llama3.tokenizer import Tokenizer, build_once, cache_dir, read_text, stdlib_files

Split = Literal["train", "validation", "all"]
# Document i is held out for validation when i % VALIDATION_EVERY == VALIDATION_EVERY - 1.
VALIDATION_EVERY = 20
_BATCH_DOCS = 256
_FORMAT_VERSION = 1
_DTYPES = {"uint16": (torch.uint16, "H"), "uint32": (torch.uint32, "I")}
_SCAN_CHUNK = 1 << 22  # tokens widened at a time when checking a .bin file's ids


class DocumentSource(ABC):
    """An ordered, deterministic collection of text documents."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """Yield the documents in a fixed order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the documents do (keys the token cache)."""


class StdlibSource(DocumentSource):
    """The standard library's ``.py`` files, one document each, sorted by path.

    ``max_bytes`` keeps only the sorted files up to that many bytes (None: all, ~30 MB).
    """

    def __init__(self, max_bytes: int | None = 16_000_000) -> None:
        self.max_bytes = max_bytes

    def _files(self) -> list[Path]:
        files, total = [], 0
        for f in stdlib_files():
            if self.max_bytes is not None and total >= self.max_bytes:
                break
            files.append(f)
            total += f.stat().st_size
        return files

    def documents(self) -> Iterator[str]:
        return (read_text(f) for f in self._files())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for f in self._files():
            digest.update(f.read_bytes())
        return f"stdlib:{digest.hexdigest()}"


class TextFileSource(DocumentSource):
    """A UTF-8 text file: documents separated by blank lines, or the whole file as one document."""

    def __init__(
        self, path: str | os.PathLike[str], mode: Literal["paragraphs", "file"] = "paragraphs"
    ) -> None:
        if mode not in ("paragraphs", "file"):
            raise ValueError(
                f"TextFileSource mode {mode!r} is unknown; use 'paragraphs' or 'file'."
            )
        self.path, self.mode = _existing(path), mode

    def documents(self) -> Iterator[str]:
        text = _read_utf8(self.path)
        if self.mode == "file":
            yield text
            return
        for doc in re.split(r"\n\s*\n", text):
            if doc.strip():
                yield doc.strip()

    def fingerprint(self) -> str:
        return f"text:{self.mode}:{_stat_key(self.path)}"


class JsonlSource(DocumentSource):
    """A JSON-lines file with one document per line in the string field ``field``."""

    def __init__(self, path: str | os.PathLike[str], field: str = "text") -> None:
        self.path, self.field = _existing(path), field

    def documents(self) -> Iterator[str]:
        offset = 0  # byte offset of the current line in the file
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                line = self._decode(raw, n, offset)
                offset += len(raw)
                if line.strip():
                    yield self._text(line, n)

    def _decode(self, raw: bytes, n: int, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{self.path}:{n} is not valid UTF-8: byte {e.start} of the line (byte offset "
                f"{offset + e.start} in the file) is {raw[e.start : e.start + 1]!r} ({e.reason}); "
                "re-encode the file as UTF-8."
            ) from None

    def _text(self, line: str, n: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{self.path}:{n} is not valid JSON: {e.msg} at column {e.colno}; fix or remove "
                "that line (each line must hold one JSON object)."
            ) from None
        text = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f"{self.path}:{n} has no string field {self.field!r}; pass field= with the name "
                "of the field that holds the document text."
            )
        return text

    def fingerprint(self) -> str:
        return f"jsonl:{self.field}:{_stat_key(self.path)}"


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Data file {p} does not exist; pass the path of an existing file.")
    return p


def _read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"Data file {path} is not valid UTF-8: the byte at offset {e.start} (line {line}) "
            f"is {data[e.start : e.start + 1]!r} ({e.reason}); re-encode the file as UTF-8."
        ) from None


def _stat_key(path: Path) -> str:
    # Path, size and mtime: cheap to compute for multi-GB files, and changes when they are edited.
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def split_documents(docs: Iterable[str], split: Split) -> Iterator[str]:
    """Every ``VALIDATION_EVERY``-th document is validation, the rest train; "all" keeps all."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split {split!r} is unknown; use 'train', 'validation' or 'all'.")
    for i, doc in enumerate(docs):
        held_out = i % VALIDATION_EVERY == VALIDATION_EVERY - 1
        if split == "all" or held_out == (split == "validation"):
            yield doc


def token_dtype(vocab_size: int) -> str:
    """The smallest supported id dtype for a vocabulary: "uint16" or "uint32"."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_token_file(
    docs: Iterable[str], tokenizer: Tokenizer, path: str | os.PathLike[str], dtype: str
) -> int:
    """Write ``[bos] + ids + [eos]`` for each document to ``path``; return the token count."""
    if dtype not in _DTYPES:
        raise ValueError(f"Token dtype {dtype!r} is unsupported; use one of {sorted(_DTYPES)}.")
    typecode = _DTYPES[dtype][1]
    if tokenizer.vocab_size > 2 ** (8 * array(typecode).itemsize):
        raise ValueError(
            f"A vocabulary of {tokenizer.vocab_size} ids does not fit {dtype}; use "
            f"{token_dtype(tokenizer.vocab_size)}."
        )
    count = 0
    docs_iter = iter(docs)
    with open(path, "wb") as f:
        while batch := list(itertools.islice(docs_iter, _BATCH_DOCS)):
            out = array(typecode)
            for ids in tokenizer.encode_batch(batch):
                out.append(tokenizer.bos_id)
                out.extend(ids)
                out.append(tokenizer.eos_id)
            f.write(out.tobytes())
            count += len(out)
    return count


class PackedDataset(Dataset[dict[str, torch.Tensor]]):
    """Non-overlapping ``seq_len + 1`` chunks of a memory-mapped token file.

    Item ``i`` is ``{"input_ids": chunk[:-1], "labels": chunk[1:]}`` (int64, length ``seq_len``);
    the trailing partial chunk is dropped. Pickles by path, so spawned workers reopen the map.
    """

    def __init__(self, path: str | os.PathLike[str], seq_len: int, dtype: str = "uint16") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"Token dtype {dtype!r} is unsupported; use one of {sorted(_DTYPES)}.")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
        self.path, self.seq_len, self.dtype = _existing(path), seq_len, dtype
        itemsize = array(_DTYPES[dtype][1]).itemsize
        size = self.path.stat().st_size
        if size % itemsize:
            raise ValueError(
                f"Token file {self.path} has {size} bytes, not a multiple of {itemsize}; pass the "
                "dtype it was written with (uint16 or uint32)."
            )
        self.num_tokens = size // itemsize
        self._tokens: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        """The whole token stream as a (memory-mapped) 1-D tensor."""
        if self._tokens is None:
            self._tokens = torch.from_file(
                str(self.path), shared=False, size=self.num_tokens, dtype=_DTYPES[self.dtype][0]
            )
        return self._tokens

    def __len__(self) -> int:
        return self.num_tokens // (self.seq_len + 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Sequence index {index} is outside 0..{len(self) - 1}.")
        start = index * (self.seq_len + 1)
        chunk = self.tokens[start : start + self.seq_len + 1].to(torch.int64)
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


class WithDocumentIds(Dataset[dict[str, torch.Tensor]]):
    """A packed dataset whose items also carry ``document_ids``: for every input token, the
    index within its chunk of the document it belongs to (a new document starts at each bos),
    for document-causal attention over packed sequences."""

    def __init__(self, dataset: Dataset[dict[str, torch.Tensor]], bos_id: int) -> None:
        self.dataset, self.bos_id = dataset, bos_id

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        starts = (item["input_ids"] == self.bos_id).to(torch.int64)
        return {**item, "document_ids": torch.cumsum(starts, dim=0)}


def build_dataset(
    source: DocumentSource | str | os.PathLike[str],
    tokenizer: Tokenizer,
    seq_len: int,
    split: Split = "train",
    *,
    dtype: str | None = None,
) -> PackedDataset:
    """Packed dataset of a source, tokenized once and cached under ``cache_dir()/tokens``.

    ``source`` is a :class:`DocumentSource`, ``"stdlib"``, or a file path: ``*.jsonl`` (field
    "text"), ``*.bin`` (pre-tokenized ids of ``dtype``; used as is, so ``split`` must be "all",
    after checking every id is below the tokenizer's ``vocab_size``), anything else plain UTF-8
    text with blank-line-separated documents.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".bin":
        if split != "all":
            raise ValueError(
                f"Pre-tokenized file {source} has no document split; pass split='all' and give "
                "validation its own .bin file."
            )
        dataset = PackedDataset(source, seq_len, dtype or token_dtype(tokenizer.vocab_size))
        check_token_ids(dataset, tokenizer.vocab_size)
        return dataset
    src = as_source(source)
    dtype = dtype or token_dtype(tokenizer.vocab_size)
    key = f"v{_FORMAT_VERSION}|{src.fingerprint()}|{tokenizer.fingerprint}|{split}|{dtype}"
    name = f"{type(src).__name__}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.bin"
    path = build_once(
        cache_dir() / "tokens" / name,
        lambda tmp: write_token_file(
            split_documents(src.documents(), split), tokenizer, tmp, dtype
        ),
    )
    return PackedDataset(path, seq_len, dtype)


def max_token_id(tokens: torch.Tensor, chunk: int = _SCAN_CHUNK) -> int:
    """The largest id of a 1-D token tensor (-1 if empty), read ``chunk`` tokens at a time."""
    # Unsigned tensors have no max(); widening the whole memory map at once would copy it all.
    wide = torch.int32 if tokens.dtype == torch.uint16 else torch.int64
    largest = -1
    for start in range(0, tokens.numel(), chunk):
        largest = max(largest, int(tokens[start : start + chunk].to(wide).max()))
    return largest


def check_token_ids(dataset: PackedDataset, vocab_size: int) -> None:
    """Raise unless every id in the dataset's token file is below ``vocab_size``."""
    largest = max_token_id(dataset.tokens)
    if largest >= vocab_size:
        raise ValueError(
            f"Token file {dataset.path} holds id {largest}, but the tokenizer's vocabulary has "
            f"{vocab_size} ids (0..{vocab_size - 1}); pass the tokenizer the file was written "
            f"with, re-tokenize it with this one, or pass the dtype it was written with (read "
            f"as {dataset.dtype})."
        )


def as_source(source: DocumentSource | str | os.PathLike[str]) -> DocumentSource:
    """A source object for ``"stdlib"``, a ``.jsonl`` path or a text path."""
    if isinstance(source, DocumentSource):
        return source
    if source == "stdlib":
        return StdlibSource()
    path = Path(source)
    return JsonlSource(path) if path.suffix == ".jsonl" else TextFileSource(path)


def build_dataloader(
    dataset: Dataset[Any],
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int = 0,
    shuffle: bool = True,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """A checkpointable loader over this data-parallel rank's share of ``dataset``.

    Every rank gets ``len(dataset) // dp_size`` samples (remainder dropped) and full batches only,
    so all ranks take the same number of steps. The trainer's checkpoints resume it at the next
    unseen sample of the epoch's global order (under any data-parallel degree); on its own,
    ``loader.state_dict()`` / ``load_state_dict`` resume it at the next unseen batch.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} must be in 0..{dp_size - 1} for dp_size {dp_size}.")
    # The trainer's global-order sampler: a checkpoint resumes it mid-epoch even after the
    # data-parallel degree changed.
    sampler = GlobalOrderSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=dp_size,
        rank=dp_rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=True,
    )
    if len(sampler) < batch_size:
        raise ValueError(
            f"Each of the {dp_size} data-parallel ranks gets {len(sampler)} sequences, fewer than "
            f"batch_size {batch_size}; use a larger dataset, a smaller batch size or seq_len."
        )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
