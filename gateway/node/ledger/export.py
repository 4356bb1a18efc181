"""Exporting the ledger as CSV or JSON Lines, streaming."""

from __future__ import annotations

import csv
import io
import json
from typing import BinaryIO, Literal

from sqlalchemy.orm import Session

from gateway.errors import InvalidInput
from gateway.node.ledger.read import iter_entries

__all__ = ["ExportFormat", "export"]

ExportFormat = Literal["csv", "jsonl"]

_CSV_FIELDS = (
    "seq",
    "time",
    "kind",
    "actor",
    "role",
    "bundle_id",
    "consent_id",
    "body",
    "prev_hash",
    "entry_hash",
)


def _csv_safe(value: object) -> str:
    """A cell that no spreadsheet will run as a formula."""
    if value is None:
        return ""
    text_value = str(value)
    if text_value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text_value
    return text_value


def export(session: Session, fmt: ExportFormat, out: BinaryIO) -> int:
    """Write every entry to ``out`` as CSV or JSON Lines, streaming; return the count.

    JSON Lines carry the hashed canonical bytes too (``entry``), so anyone can
    recompute the chain from the export alone.
    """
    if fmt not in ("csv", "jsonl"):
        raise InvalidInput(f"export format must be csv or jsonl, not {fmt!r}")
    count = 0
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(_CSV_FIELDS)
        for entry in iter_entries(session):
            data = entry.to_dict()
            data["body"] = json.dumps(entry.body, sort_keys=True, ensure_ascii=False)
            writer.writerow([_csv_safe(data[name]) for name in _CSV_FIELDS])
            count += 1
            if buffer.tell() > 1 << 16:
                out.write(buffer.getvalue().encode("utf-8"))
                buffer.seek(0)
                buffer.truncate()
        out.write(buffer.getvalue().encode("utf-8"))
        return count
    for entry in iter_entries(session):
        line = entry.to_dict()
        line["entry"] = entry.canonical.decode("utf-8", errors="replace")
        out.write(json.dumps(line, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
        count += 1
    return count
