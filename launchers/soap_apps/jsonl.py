"""The metrics file of both applications: one JSON object per line, appended by rank 0 only.

Pre-training (``soap_apps.pretrain.metrics.Metrics``) and fine-tuning (``soap_apps.finetune.train``)
write their ``metrics.jsonl`` through ``JsonlLog``; what goes into the records is theirs. Each
record is appended and flushed as it is written, so an interrupted run leaves every record it got to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from soap_apps.config_loader import ConfigError


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file, in order ([] when there is no file).

    A last line that is not a JSON object is what a kill mid-write leaves: it is dropped with a
    warning (a resumed run then rewrites the file without it). A bad line elsewhere means the
    file is damaged: ConfigError naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        raise ConfigError(f"{path} is not a text file of JSON lines ({reason})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        if (record := _record(line)) is not None:
            records.append(record)
        elif i == len(lines) - 1:
            print(f"warning: {path} line {n} is cut off (a write interrupted?); ignoring it", file=sys.stderr)
        else:
            raise ConfigError(
                f"{path} line {n} is not a JSON object ({line[:60]!r}); the file is damaged: "
                "fix or delete that line"
            )
    return records


def records_through(path: str | Path, step: int) -> list[dict[str, Any]]:
    """The records of ``path`` whose ``step`` is at most ``step``: what a run resumed from the
    checkpoint of ``step`` keeps (``JsonlLog.replace``) before it appends again."""
    return [r for r in read_records(path) if r["step"] <= step]


class JsonlLog:
    """Appends records to ``path`` when ``enabled`` (rank 0); on the other ranks every call is a no-op."""

    def __init__(self, path: str | Path, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a line."""
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def replace(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the file to hold exactly ``records`` (a resumed run drops those past its checkpoint)."""
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in records))
