"""Envelope throughput beside the bare libsodium work it is made of, in one run.

Prints seal and open times for small cases (about 4 KiB of case JSON) and for
one large attachment, next to the *floor*: PyNaCl's bindings to libsodium
doing the same crypto work on the same number of bytes: secretstream (64 KiB
chunks), one Ed25519 signature (made to seal, verified to open) and the
sealed boxes (two made to seal: recipient and archive; one opened to open),
with the same file I/O. Ours and the floor alternate batch by batch, for
``--repeats`` rounds; the medians and their ratio are printed. The ratio says
what the envelope's own work costs (canonical JSON, schema validation, key
derivation, SHA-256 of the ciphertext, the separate verification pass when
opening). Run: ``.venv/bin/python benchmarks/envelope.py [--cases 200]
[--repeats 7] [--mib 64] [--clock wall|cpu]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nacl.bindings as sodium

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.core.envelope import AttachmentSource, open_envelope, seal
from gateway.core.secretstream import CHUNK_SIZE
from tests.unit.test_envelope_support import JP, NOW, PK, POLICY, example

_PUSH = sodium.crypto_secretstream_xchacha20poly1305_push
_PULL = sodium.crypto_secretstream_xchacha20poly1305_pull
_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE


CLOCK: Callable[[], float] = time.perf_counter
"""Wall time; ``--clock cpu`` takes this process's CPU time (steadier on a busy machine)."""


def interleaved(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run each action once per round, in turn, for ``repeats`` rounds; the median times."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = CLOCK()
            action()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(series) for name, series in times.items()}


def floor_seal(source: io.RawIOBase | io.BufferedIOBase, size: int, out: io.BufferedIOBase) -> None:
    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    out.write(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key))
    left = size
    while True:
        take = min(CHUNK_SIZE, left)
        left -= take
        out.write(_PUSH(state, source.read(take), None, _FINAL if left == 0 else _MESSAGE))
        if left == 0:
            break
    recipient = PK.manifest.current_encryption_key(now=NOW).public
    archive = bytes(JP.keyring.encryption_private(JP.keyring.current_encryption_key_id).public_key)
    sodium.crypto_box_seal(key, recipient)
    sodium.crypto_box_seal(key, archive)
    JP.keyring.signing_key.sign(b"h" * 900)


def floor_open(stream: io.BufferedIOBase, size: int, sealed: bytes, signed: bytes) -> None:
    private = PK.keyring.encryption_private(PK.keyring.current_encryption_key_id)
    key = sodium.crypto_box_seal_open(sealed, bytes(private.public_key), bytes(private))
    JP.keyring.signing_key.verify_key.verify(signed)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, stream.read(24), key)
    left = size
    while True:
        take = min(CHUNK_SIZE, left)
        left -= take
        _PULL(state, stream.read(take + 17), None)
        if left == 0:
            break


def sealed_key(key: bytes) -> bytes:
    private = PK.keyring.encryption_private(PK.keyring.current_encryption_key_id)
    return bytes(sodium.crypto_box_seal(key, bytes(private.public_key)))


def row(label: str, ours: float, floor: float, count: int, per: str) -> None:
    print(
        f"{label:<26} ours {ours / count * 1e3:9.3f} ms/{per:<6} floor "
        f"{floor / count * 1e3:9.3f} ms/{per:<6} ratio {ours / floor:5.2f}x"
    )


def small_cases(count: int, repeats: int) -> None:
    case = example("consultation")
    case["minutes"] = "Minutes of the session. " * 160  # about 4 KiB of case JSON
    envelopes: list[bytes] = []

    def ours_seal() -> None:
        envelopes.clear()
        for number in range(count):
            out = io.BytesIO()
            seal(
                out,
                case_type="consultation",
                case=case,
                keyring=JP.keyring,
                peer_manifest=PK.manifest,
                policy=POLICY,
                sequence=number + 1,
                now=NOW,
            )
            envelopes.append(out.getvalue())

    def ours_open() -> None:
        for envelope in envelopes:
            open_envelope(
                io.BytesIO(envelope),
                keyring=PK.keyring,
                peer_manifest=JP.manifest,
                policy=POLICY,
                now=NOW,
            )

    content = b"c" * 4400
    sealed_streams: list[tuple[bytes, bytes]] = []

    def bare_seal() -> None:
        sealed_streams.clear()
        for _ in range(count):
            out = io.BytesIO()
            floor_seal(io.BytesIO(content), len(content), out)
            sealed_streams.append((out.getvalue(), b""))

    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    stream = header + _PUSH(state, content, None, _FINAL)
    signed = JP.keyring.signing_key.sign(b"h" * 900)

    sealed = sealed_key(key)

    def bare_open() -> None:
        for _ in range(count):
            floor_open(io.BytesIO(stream), len(content), sealed, signed)

    ours_seal()  # the envelopes ours_open reads, and a warm-up
    times = interleaved(
        {"seal": ours_seal, "floor seal": bare_seal, "open": ours_open, "floor open": bare_open},
        repeats,
    )
    print(f"\n{count} cases of about 4 KiB, median of {repeats} interleaved rounds:")
    row("seal", times["seal"], times["floor seal"], count, "case")
    row("open (verify + decrypt)", times["open"], times["floor open"], count, "case")


def large_attachment(mib: int, repeats: int) -> None:
    size = mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "source.bin"
        block = hashlib.shake_256(b"bench").digest(1 << 20)
        with source.open("wb") as handle:
            for _ in range(mib):
                handle.write(block)
        envelope = work / "bundle.env"
        bare = work / "bare.bin"

        def ours_seal() -> None:
            with source.open("rb") as src, envelope.open("w+b") as out:
                seal(
                    out,
                    case_type="consultation",
                    case=example("consultation"),
                    attachments=[AttachmentSource("source.bin", size, src)],
                    keyring=JP.keyring,
                    peer_manifest=PK.manifest,
                    policy=POLICY,
                    sequence=1,
                    now=NOW,
                )

        def ours_open() -> None:
            with envelope.open("rb") as stream, (work / "out.bin").open("wb") as sink:
                open_envelope(
                    stream,
                    keyring=PK.keyring,
                    peer_manifest=JP.manifest,
                    policy=POLICY,
                    now=NOW,
                    sink_factory=lambda info: sink,
                )

        key = sodium.crypto_secretstream_xchacha20poly1305_keygen()

        def bare_seal() -> None:
            with source.open("rb") as src, bare.open("wb") as out:
                floor_seal(src, size, out)

        def bare_seal_fixed_key() -> None:
            state = sodium.crypto_secretstream_xchacha20poly1305_state()
            with source.open("rb") as src, bare.open("wb") as out:
                out.write(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key))
                left = size
                while left:
                    take = min(CHUNK_SIZE, left)
                    left -= take
                    out.write(_PUSH(state, src.read(take), None, _FINAL if not left else _MESSAGE))

        signed = JP.keyring.signing_key.sign(b"h" * 900)

        sealed = sealed_key(key)

        def bare_open() -> None:
            with bare.open("rb") as stream, (work / "out.bin").open("wb") as sink:
                floor_open(_Tee(stream, sink), size, sealed, signed)

        ours_seal()
        bare_seal_fixed_key()
        times = interleaved({"open": ours_open, "floor open": bare_open}, repeats)
        times |= interleaved({"seal": ours_seal, "floor seal": bare_seal}, repeats)
        print(f"\none attachment of {mib} MiB, file to file, median of {repeats} rounds:")
        row("seal", times["seal"], times["floor seal"], mib, "MiB")
        row("open (verify + decrypt)", times["open"], times["floor open"], mib, "MiB")


class _Tee:
    """Reads from the stream; the floor's plaintext writes are modelled by writing
    what it reads (same number of bytes as the decrypted output)."""

    def __init__(self, stream: io.BufferedIOBase, sink: io.BufferedIOBase) -> None:
        self.stream = stream
        self.sink = sink

    def read(self, count: int) -> bytes:
        data = self.stream.read(count)
        self.sink.write(data)
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="0 leaves the attachment out")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20 cases, 4 MiB, 3 repeats"
    )
    args = parser.parse_args()
    if args.quick:
        args.cases, args.mib, args.repeats = 20, 4, 3
    global CLOCK  # noqa: PLW0603 - set once, before anything is timed
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        "ssw-gateway envelope benchmark (ratio = ours / floor time; 1.00x is the floor; "
        f"{args.clock} clock)"
    )
    small_cases(args.cases, args.repeats)
    if args.mib:
        large_attachment(args.mib, max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
