"""The file shell around the envelope: atomic writes, no overwrite, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.envelope import EnvelopeInvalid
from gateway.errors import AlreadyExists, InvalidInput
from gateway.node.bundles import open_to_dir, seal_to_file
from tests.unit.test_envelope_support import JP, NOW, PK, POLICY, example


def make(tmp_path: Path, attachments: dict[str, bytes]) -> Path:
    sources = []
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name, data in attachments.items():
        path = folder / name
        path.write_bytes(data)
        sources.append(path)
    target = tmp_path / "store" / "bundle.env"
    seal_to_file(
        target,
        case_type="exam-fraud",
        case=example("exam-fraud"),
        attachments=sources,
        keyring=JP.keyring,
        peer_manifest=PK.manifest,
        policy=POLICY,
        sequence=1,
        now=NOW,
    )
    return target


def open_into(envelope: Path, out: Path) -> list[str]:
    result = open_to_dir(
        envelope, out, keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY, now=NOW
    )
    return [f.path.name for f in result.files]


def test_sealed_file_opens_into_the_output_folder(tmp_path: Path) -> None:
    envelope = make(tmp_path, {"scan.pdf": b"%PDF" * 1000, "notes.txt": b"n"})
    out = tmp_path / "out"
    out.mkdir()
    assert open_into(envelope, out) == ["scan.pdf", "notes.txt"]
    assert (out / "scan.pdf").read_bytes() == b"%PDF" * 1000
    assert sorted(p.name for p in envelope.parent.iterdir()) == ["bundle.env"]
    assert envelope.stat().st_mode & 0o777 == 0o600


def test_opening_twice_never_overwrites(tmp_path: Path) -> None:
    envelope = make(tmp_path, {"scan.pdf": b"1"})
    out = tmp_path / "out"
    out.mkdir()
    open_into(envelope, out)
    assert open_into(envelope, out) == ["scan-1.pdf"]


def test_sealing_onto_an_existing_file_is_refused(tmp_path: Path) -> None:
    envelope = make(tmp_path, {})
    before = envelope.read_bytes()
    with pytest.raises(AlreadyExists):
        make(tmp_path, {})
    assert envelope.read_bytes() == before


def test_tampered_envelope_leaves_no_file_in_the_output_folder(tmp_path: Path) -> None:
    envelope = make(tmp_path, {"scan.pdf": b"x" * 200_000})
    data = bytearray(envelope.read_bytes())
    data[-10] ^= 1
    envelope.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EnvelopeInvalid):
        open_into(envelope, out)
    assert list(out.iterdir()) == []


def test_failed_seal_leaves_no_file(tmp_path: Path) -> None:
    bad = example("exam-fraud")
    bad["fraud"] = "cheating"
    store = tmp_path / "store"
    with pytest.raises(InvalidInput, match="fraud"):
        seal_to_file(
            store / "bundle.env",
            case_type="exam-fraud",
            case=bad,
            keyring=JP.keyring,
            peer_manifest=PK.manifest,
            policy=POLICY,
            sequence=1,
            now=NOW,
        )
    assert list(store.iterdir()) == []


def test_missing_attachment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"missing\.pdf: cannot be read"):
        seal_to_file(
            tmp_path / "bundle.env",
            case_type="consultation",
            case=example("consultation"),
            attachments=[tmp_path / "missing.pdf"],
            keyring=JP.keyring,
            peer_manifest=PK.manifest,
            policy=POLICY,
            sequence=1,
            now=NOW,
        )
    assert not (tmp_path / "bundle.env").exists()


def test_hostile_attachment_name_stays_in_the_output_folder(tmp_path: Path) -> None:
    import io  # noqa: PLC0415

    from gateway.core.envelope import AttachmentSource, seal  # noqa: PLC0415

    envelope = tmp_path / "bundle.env"
    with envelope.open("w+b") as out:
        seal(
            out,
            case_type="consultation",
            case=example("consultation"),
            attachments=[AttachmentSource("../../escape.sh", 2, io.BytesIO(b"hi"))],
            keyring=JP.keyring,
            peer_manifest=PK.manifest,
            policy=POLICY,
            sequence=1,
            now=NOW,
        )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert open_into(envelope, out_dir) == ["_.._escape.sh"]
    assert not (tmp_path / "escape.sh").exists()
