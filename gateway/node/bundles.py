"""Files in and out of envelopes: attachment sources, output sinks, safe paths.

The envelope core (:mod:`gateway.core.envelope`) takes and gives file objects
only; this shell opens the files. Decrypted attachments are written to a
temporary file in the output folder and moved into place only after the final
chunk authenticated and the whole envelope verified, so a failure leaves no
file behind, and a name from the envelope never leaves the output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.core.filenames import sanitise_attachment_name
from gateway.errors import InvalidInput

__all__ = ["safe_output_path"]


def safe_output_path(out_dir: Path, name: str) -> Path:
    """Where attachment ``name`` is written inside ``out_dir``; never outside it.

    The name is sanitised to one path component; if that file exists already
    (or a link of that name does), ``-1``, ``-2``... is added before the
    extension: nothing is ever overwritten, and no existing link is followed.
    """
    if not out_dir.is_dir():
        raise InvalidInput(f"{out_dir}: the output folder does not exist or is not a folder")
    root = out_dir.resolve(strict=True)
    clean = sanitise_attachment_name(name)
    stem, dot, suffix = clean.rpartition(".")
    if not dot or not stem:
        stem, suffix = clean, ""
    for counter in range(10_000):
        candidate_name = (
            clean
            if counter == 0
            else (f"{stem}-{counter}.{suffix}" if suffix else f"{stem}-{counter}")
        )
        candidate = root / candidate_name
        if candidate.parent != root or os.sep in candidate_name or candidate_name in (".", ".."):
            raise InvalidInput("attachment name does not stay inside the output folder")
        if not os.path.lexists(candidate):
            return candidate
    raise InvalidInput(f"too many files named like {clean!r} in {out_dir}")
