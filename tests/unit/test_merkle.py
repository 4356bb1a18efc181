"""RFC 9162 Merkle trees: the published vectors, and proofs we generate ourselves."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleProofInvalid,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent.parent / "data" / "merkle"
VECTOR_COUNT = 196


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _proof(value: list[str] | None) -> list[bytes]:
    return [_b64(item) for item in value or []]


def _vector_files() -> list[Path]:
    return sorted(VECTORS.rglob("*.json"))


def _check_vector(path: Path) -> None:
    data: dict[str, Any] = json.loads(path.read_text())
    if "leafIdx" in data:
        verify_inclusion(
            data["leafIdx"],
            data["treeSize"],
            _b64(data["leafHash"]),
            _proof(data["proof"]),
            _b64(data["root"]),
        )
    else:
        verify_consistency(
            data["size1"],
            data["size2"],
            _b64(data["root1"]),
            _b64(data["root2"]),
            _proof(data["proof"]),
        )


def test_every_vector_file_is_loaded() -> None:
    files = _vector_files()
    assert len(files) == VECTOR_COUNT
    kinds = {path.relative_to(VECTORS).parts[0] for path in files}
    assert kinds == {"inclusion", "consistency"}
    assert (VECTORS / "LICENSE").is_file()


@pytest.mark.parametrize("path", _vector_files(), ids=lambda p: str(p.relative_to(VECTORS)))
def test_vector_accepted_or_refused_as_published(path: Path) -> None:
    want_error = json.loads(path.read_text())["wantErr"]
    if want_error:
        with pytest.raises(MerkleProofInvalid):
            _check_vector(path)
    else:
        _check_vector(path)


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def _reference_root(hashes: list[bytes]) -> bytes:
    """MTH by the recursive definition of RFC 9162 §2.1.1, as the oracle."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(_reference_root(hashes[:k]), _reference_root(hashes[k:]))


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert root_from_leaf_hashes([]) == hashlib.sha256(b"").digest()


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    # The known root of the RFC 6962 reference tree of eight leaves.
    leaves = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    root = root_from_leaf_hashes(leaf_hash(leaf) for leaf in leaves)
    assert root.hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 100])
def test_incremental_root_matches_recursive_definition(n: int) -> None:
    hashes = _leaves(n)
    compact = CompactRange()
    for i, hashed in enumerate(hashes, start=1):
        compact.append_leaf_hash(hashed)
        assert compact.root() == _reference_root(hashes[:i])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 21, 64, 65])
def test_every_generated_inclusion_proof_verifies(n: int) -> None:
    hashes = _leaves(n)
    root = root_from_leaf_hashes(hashes)
    for index in range(n):
        verify_inclusion(index, n, hashes[index], inclusion_proof(index, hashes), root)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 21, 64, 65])
def test_every_generated_consistency_proof_verifies(n: int) -> None:
    hashes = _leaves(n)
    new_root = root_from_leaf_hashes(hashes)
    for m in range(1, n + 1):
        proof = consistency_proof(m, hashes)
        verify_consistency(m, n, root_from_leaf_hashes(hashes[:m]), new_root, proof)


def test_inclusion_proof_for_another_leaf_is_refused() -> None:
    hashes = _leaves(10)
    root = root_from_leaf_hashes(hashes)
    proof = inclusion_proof(3, hashes)
    with pytest.raises(MerkleProofInvalid):
        verify_inclusion(4, 10, hashes[4], proof, root)


def test_consistency_with_a_rewritten_prefix_is_refused() -> None:
    hashes = _leaves(12)
    old_root = root_from_leaf_hashes(hashes[:7])
    rewritten = list(hashes)
    rewritten[2] = leaf_hash(b"rewritten")
    proof = consistency_proof(7, rewritten)
    with pytest.raises(MerkleProofInvalid, match="old root"):
        verify_consistency(7, 12, old_root, root_from_leaf_hashes(rewritten), proof)


def test_overlong_proof_is_refused_unread() -> None:
    with pytest.raises(MerkleProofInvalid, match="longer than any valid proof"):
        verify_inclusion(0, 2, b"\x00" * 32, [b"\x00" * 32] * 129, b"\x00" * 32)


@pytest.mark.parametrize(
    ("index", "size"), [(0, 0), (-1, 4), (4, 4)], ids=["empty", "negative", "past-end"]
)
def test_inclusion_proof_generation_refuses_bad_index(index: int, size: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(index, _leaves(size))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=200), st.data())
def test_random_prefixes_are_consistent_and_entries_included(n: int, data: st.DataObject) -> None:
    hashes = _leaves(n)
    m = data.draw(st.integers(min_value=1, max_value=n))
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    root = root_from_leaf_hashes(hashes)
    verify_consistency(m, n, root_from_leaf_hashes(hashes[:m]), root, consistency_proof(m, hashes))
    verify_inclusion(index, n, hashes[index], inclusion_proof(index, hashes), root)
