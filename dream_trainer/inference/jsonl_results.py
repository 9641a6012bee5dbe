"""A JSONL file of results keyed by a primary key, appended record by record, resumable."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("dream_trainer.inference")


class JsonlResultFile:
    """Results as one JSON object per line, each holding its item's primary key.

    Each record is written with a single ``write`` of the whole line on a file opened for
    appending, so a killed writer leaves whole lines, at worst followed by one torn line
    without its newline. :meth:`recover` drops such a tail, so a resumed run never trips
    over it and rewrites that record.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self._fd: int | None = None

    def recover(self) -> list[Any]:
        """Keys of the complete records, in file order; a torn last line is cut off (warned)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keys: list[Any] = []
        end = 0  # byte offset just past the last complete record
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=1):
            is_last = number == len(lines)
            if is_last and not line:
                break
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = _TORN
            if record is _TORN or (is_last and line):
                if not is_last:
                    raise ValueError(
                        f"{self.path}:{number} is not a JSON object; only the last line of a "
                        "results file can be incomplete (a killed writer). Fix or remove that "
                        "line, or write to a new file."
                    )
                logger.warning(
                    "%s: dropping an incomplete last line (%d bytes, a killed writer); its "
                    "record will be written again",
                    self.path,
                    len(line),
                )
                with open(self.path, "r+b") as file:
                    file.truncate(end)
                break
            end += len(line) + 1
            if record is None:
                continue
            if not isinstance(record, dict) or self.key not in record:
                raise ValueError(
                    f"{self.path}:{number} has no {self.key!r} field; a results file holds one "
                    f"JSON object per line with the primary key {self.key!r}"
                )
            keys.append(record[self.key])
        return keys

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in file order."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    break  # the torn tail of a killed writer
        return out

    def append(self, records: list[dict[str, Any]], sync: bool = True) -> None:
        """Write ``records`` (one ``write`` each), then fsync once if ``sync``."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for record in records:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            written = os.write(self._fd, data)
            if written != len(data):  # a full disk; the torn line is recovered on resume
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        if sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_TORN = object()
