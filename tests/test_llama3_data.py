"""Tests of the Llama 3 example's tokenizers, token packing and resumable per-rank loaders."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

import pytest
import torch

from examples.llama3 import data as data_module
from examples.llama3.data import (
    VALIDATION_EVERY,
    JsonlSource,
    PackedDataset,
    StdlibSource,
    build_dataloader,
    build_dataset,
    max_token_id,
    split_documents,
    write_token_file,
)
from examples.llama3.tokenizer import (
    LLAMA3_NUM_SPECIAL,
    TiktokenTokenizer,
    Tokenizer,
    build_once,
    default_tokenizer,
    load_tokenizer,
    read_text,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"def f{i}(x):\n    return x * {i}  # doc {i} ünïcode" for i in range(45)]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its caches under its own tmp dir, never ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DREAM_TRAINER_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAM_TRAINER_CACHE", str(tmp_path_factory.mktemp("tok")))
        return default_tokenizer()


def test_default_tokenizer_round_trips(tok: Tokenizer) -> None:
    assert tok.vocab_size == 2048 and (tok.bos_id, tok.eos_id) == (0, 1)
    for text in [
        "",
        "x",
        "def f(a, b):\n\treturn a  +  b\n\n",
        "héllo wörld 🙂 日本語\r\n",
        " " * 9,
    ]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]
    assert len(tok.encode("import os\nimport sys\n")) < len("import os\nimport sys\n") / 2


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    small = dict(vocab_size=400, corpus_bytes=300_000)
    first = default_tokenizer(**small)  # type: ignore[arg-type]
    # A second training in a fresh process (fresh Rust hash seeds) into another cache dir.
    code = (
        "from examples.llama3.tokenizer import default_tokenizer; "
        "print(default_tokenizer(vocab_size=400, corpus_bytes=300_000).path)"
    )
    env = {**os.environ, "DREAM_TRAINER_CACHE": str(tmp_path / "other")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    second = Path(out.stdout.strip())
    assert second != first.path and second.read_bytes() == first.path.read_bytes()
    assert default_tokenizer(**small).path == first.path  # type: ignore[arg-type]  # cached


def test_tiktoken_file_uses_llama3_special_tokens(tmp_path: Path) -> None:
    merges = [b"de", b"def", b"  ", b"    ", b"re", b"ret", b"retu", b"retur", b"return"]
    ranks = [bytes([b]) for b in range(256)] + merges
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tik = load_tokenizer(path)
    assert isinstance(tik, TiktokenTokenizer)
    assert tik.vocab_size == len(ranks) + LLAMA3_NUM_SPECIAL
    assert (tik.bos_id, tik.eos_id) == (len(ranks), len(ranks) + 1)
    text = "def f():\n    return 1 <|end_of_text|> ü"
    ids = tik.encode(text)
    assert tik.decode(ids) == text and tik.eos_id not in ids
    assert ranks.index(b"return") in ids
    (tmp_path / "bad.model").write_text("not a ranks file\n")
    with pytest.raises(ValueError, match="Line 1 of"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")


def test_packing_concatenates_documents_and_shifts_labels(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "docs.bin"
    count = write_token_file(DOCS, tok, path, "uint16")
    stream: list[int] = []
    for doc in DOCS:
        stream += [tok.bos_id, *tok.encode(doc), tok.eos_id]
    assert count == len(stream)
    seq_len = 31
    ds = PackedDataset(path, seq_len, "uint16")
    assert len(ds) == len(stream) // (seq_len + 1) > 2
    assert ds.tokens.tolist() == stream
    for i in (0, 1, len(ds) - 1):
        chunk = stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].tolist() == chunk[:-1]
        assert item["labels"].tolist() == chunk[1:]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_jsonl_text_and_binary_sources_pack_identically(tok: Tokenizer, tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    text = tmp_path / "docs.txt"
    text.write_text("\n\n\n".join(DOCS) + "\n")
    binary = tmp_path / "docs.bin"
    write_token_file(DOCS, tok, binary, "uint16")
    datasets = [
        build_dataset(JsonlSource(jsonl, field="body"), tok, 16, split="all"),
        build_dataset(text, tok, 16, split="all"),
        build_dataset(binary, tok, 16, split="all"),
    ]
    for ds in datasets[1:]:
        assert torch.equal(ds.tokens, datasets[0].tokens)
        assert all(torch.equal(ds[i]["labels"], datasets[0][i]["labels"]) for i in range(len(ds)))
    assert datasets[0].path.parent.name == "tokens"  # cached under DREAM_TRAINER_CACHE
    with pytest.raises(ValueError, match="no string field 'text'"):
        build_dataset(jsonl, tok, 16, split="all")
    with pytest.raises(ValueError, match="split='all'"):
        build_dataset(binary, tok, 16, split="train")


def test_train_and_validation_splits_partition_documents() -> None:
    train = list(split_documents(DOCS, "train"))
    val = list(split_documents(DOCS, "validation"))
    assert val == DOCS[VALIDATION_EVERY - 1 :: VALIDATION_EVERY]
    assert sorted(train + val) == sorted(DOCS) and not set(train) & set(val)
    docs = list(StdlibSource(max_bytes=300_000).documents())
    assert len(docs) >= 10 and docs == list(StdlibSource(300_000).documents())
    with pytest.raises(ValueError, match="split 'test' is unknown"):
        list(split_documents(DOCS, "test"))  # type: ignore[arg-type]


def _index_dataset(tmp_path: Path, n_seqs: int, seq_len: int = 7) -> PackedDataset:
    """A dataset whose sequence i starts with token i * (seq_len + 1), so items identify themselves."""
    path = tmp_path / "ids.bin"
    path.write_bytes(array("I", range(n_seqs * (seq_len + 1) + 3)).tobytes())
    return PackedDataset(path, seq_len, "uint32")


def _sample_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] // 8).tolist()


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_rank_shards_are_disjoint_and_equal(tmp_path: Path, dp_size: int) -> None:
    ds = _index_dataset(tmp_path, 103)
    per_rank = []
    for rank in range(dp_size):
        loader = build_dataloader(ds, 3, dp_rank=rank, dp_size=dp_size, seed=1)
        per_rank.append([i for b in loader for i in _sample_ids(b)])
    counts = {len(ids) for ids in per_rank}
    assert counts == {(103 // dp_size) // 3 * 3}
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)) and all(0 <= i < 103 for i in seen)
    with pytest.raises(ValueError, match=r"dp_rank 4 must be in 0\.\.3"):
        build_dataloader(ds, 3, dp_rank=4, dp_size=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly(tmp_path: Path, num_workers: int) -> None:
    ds = _index_dataset(tmp_path, 23)

    def loader() -> object:
        return build_dataloader(ds, 2, dp_rank=1, dp_size=2, seed=3, num_workers=num_workers)

    def run(dl: object, steps: int) -> list[list[int]]:
        out: list[list[int]] = []
        while len(out) < steps:  # epochs: 11 samples per rank -> 5 full batches each
            for batch in dl:  # type: ignore[attr-defined]
                out.append(_sample_ids(batch))
                if len(out) == steps:
                    break
        return out

    full = run(loader(), 12)
    assert full[:5] != full[5:10]  # each epoch reshuffles
    for stop in (3, 5, 7):
        first_dl = loader()
        first = run(first_dl, stop)
        resumed = loader()
        resumed.load_state_dict(first_dl.state_dict())  # type: ignore[attr-defined]
        assert first + run(resumed, 12 - stop) == full, stop


def test_build_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    target = tmp_path / "out" / "thing.txt"
    calls: list[int] = []

    def build(tmp: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        tmp.write_text("built")

    threads = [threading.Thread(target=build_once, args=(target, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and target.read_text() == "built"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing.txt"]

    # A lock left by a dead process on this host is stale and gets taken over.
    stale = tmp_path / "out" / "other.txt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale.with_name("other.txt.lock").write_text(f"{socket.gethostname()} {dead.pid}")
    build_once(stale, lambda tmp: tmp.write_text("ok"), timeout=10)
    assert stale.read_text() == "ok"


def _write_ids(path: Path, ids: list[int], typecode: str = "H") -> Path:
    path.write_bytes(array(typecode, ids).tobytes())
    return path


def test_a_bin_file_with_ids_beyond_the_vocabulary_names_the_file_and_the_id(
    tok: Tokenizer, tmp_path: Path
) -> None:
    path = _write_ids(tmp_path / "user.bin", [0, 5, 2047, 3000, 7, 2500, 1])
    with pytest.raises(ValueError) as error:
        build_dataset(path, tok, 2, split="all")
    message = str(error.value)
    assert f"Token file {path} holds id 3000" in message
    assert "vocabulary has 2048 ids (0..2047)" in message
    assert "read as uint16" in message
    ok = _write_ids(tmp_path / "ok.bin", [0, 5, 2047, 1])  # the largest valid id passes
    assert build_dataset(ok, tok, 1, split="all").num_tokens == 4


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_max_token_id_scans_in_chunks(tmp_path: Path, dtype: str) -> None:
    typecode = {"uint16": "H", "uint32": "I"}[dtype]
    top = 65535 if dtype == "uint16" else 2**32 - 1  # above the signed range of the same width
    ids = [3, 1, 4, 1, 5, 9, 2, 6, top, 5]  # the largest sits in the last, partial chunk
    ds = PackedDataset(_write_ids(tmp_path / "ids.bin", ids, typecode), 1, dtype)
    assert max_token_id(ds.tokens, chunk=4) == top
    assert max_token_id(ds.tokens[:8], chunk=3) == 9
    assert max_token_id(ds.tokens[:0]) == -1


def test_only_user_bin_files_are_scanned_for_ids(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[int] = []

    def counting(tokens: torch.Tensor, chunk: int = 1 << 22) -> int:
        scanned.append(tokens.numel())
        return -1

    monkeypatch.setattr(data_module, "max_token_id", counting)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(DOCS))
    build_dataset(text, tok, 16, split="all")  # writes the cached .bin
    build_dataset(text, tok, 16, split="all")  # reuses it
    assert scanned == []
    user = tmp_path / "user.bin"
    write_token_file(DOCS, tok, user, "uint16")
    ds = build_dataset(user, tok, 16, split="all")
    assert scanned == [ds.num_tokens]


def test_a_bad_jsonl_line_names_the_file_and_its_line_number(
    tok: Tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:3]] + ["", json.dumps({"text": "x"})]
    path.write_text("\n".join([*lines, '{"text": oops}', json.dumps({"text": "y"})]) + "\n")
    with pytest.raises(ValueError) as error:
        list(JsonlSource(path).documents())
    message = str(error.value)
    assert f"{path}:6 is not valid JSON: Expecting value at column 10" in message
    assert "line 1" not in message
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2 has no string field 'text'")):
        build_dataset(path, tok, 4, split="all")


def test_invalid_utf8_in_a_text_file_names_the_file_and_byte_offset(
    tok: Tokenizer, tmp_path: Path, _cache: Path
) -> None:
    path = tmp_path / "docs.txt"
    prefix = "def f():\n    return 'ü'\n\n".encode()
    path.write_bytes(prefix + b"x = '\xff'\n")
    with pytest.raises(ValueError) as error:
        build_dataset(path, tok, 4, split="all")
    message = str(error.value)
    assert f"Data file {path} is not valid UTF-8" in message
    assert f"the byte at offset {len(prefix) + 5} (line 4) is b'\\xff'" in message
    assert not list((_cache / "tokens").glob("*.bin"))  # nothing half-built is cached


def test_invalid_utf8_in_a_jsonl_file_names_the_line_and_file_offset(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    first = (json.dumps({"text": "ünïcode"}, ensure_ascii=False) + "\n").encode()
    second = b'{"text": "ok"}\r\n'
    path.write_bytes(first + second + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError) as error:
        list(JsonlSource(path).documents())
    message = str(error.value)
    assert f"{path}:3 is not valid UTF-8: byte 13 of the line" in message
    assert f"(byte offset {len(first) + len(second) + 13} in the file)" in message


def test_stdlib_sources_still_read_leniently(tmp_path: Path) -> None:
    # Some stdlib test modules are deliberately not UTF-8; the default tokenizer reads them all.
    latin1 = tmp_path / "module_iso_8859_1.py"
    latin1.write_bytes(b"# -*- coding: iso-8859-1 -*-\nx = '\xe9'\n")
    assert read_text(latin1).endswith("x = '\ufffd'\n")
