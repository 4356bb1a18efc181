"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing and proofs.

SHA-256 with domain-separated leaves and nodes::

    leaf hash = SHA-256(0x00 || leaf data)
    node hash = SHA-256(0x01 || left || right)
    MTH({})   = SHA-256()

The tree over ``n`` leaves splits at the largest power of two smaller than
``n`` (RFC 9162 §2.1.1), so every prefix of the ledger is itself a tree whose
root a checkpoint can sign, and any two checkpoints can be linked by a
consistency proof (§2.1.4) and any entry by an inclusion proof (§2.1.3).

Everything here is pure: lists of 32-byte hashes in, hashes or proofs out.
Verification refuses by raising :class:`MerkleProofInvalid`; it never
returns ``False``, so a forgotten check cannot be silently ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from gateway.errors import VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_PROOF_LENGTH",
    "CompactRange",
    "MerkleProofInvalid",
    "SubtreeRoot",
    "consistency_proof",
    "consistency_proof_from",
    "inclusion_proof",
    "inclusion_proof_from",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_PROOF_LENGTH = 128
"""No tree this side of 2**64 leaves needs a longer proof; longer ones are refused unread."""

_LEAF = b"\x00"
_NODE = b"\x01"


class MerkleProofInvalid(VerificationError):
    """An inclusion or consistency proof does not prove what it claims."""

    reason = "ledger.proof"
    check = "merkle-proof"


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n`` >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """The running Merkle root of a growing list of leaves, in O(log n) memory.

    Leaves are appended one at a time; the perfect subtrees already complete
    are kept as a stack (one per set bit of the size), so appending costs one
    leaf hash plus, on average, one node hash. :meth:`root` folds the stack
    from the right, which is exactly MTH of the leaves so far.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    @classmethod
    def restore(cls, size: int, nodes: bytes) -> CompactRange:
        """A compact range from its stored form: ``size`` and the concatenated stack.

        The stack holds one 32-byte subtree hash per set bit of ``size``, the
        largest (leftmost) subtree first. Anything else raises ``ValueError``.
        """
        if size < 0 or len(nodes) != HASH_SIZE * size.bit_count():
            raise ValueError(
                f"a compact range of {size} leaves holds {size.bit_count() if size >= 0 else 0} "
                f"hashes, not {len(nodes) / HASH_SIZE:g}"
            )
        compact = cls()
        compact.size = size
        compact._stack = [nodes[i : i + HASH_SIZE] for i in range(0, len(nodes), HASH_SIZE)]
        return compact

    def to_bytes(self) -> bytes:
        """The stack, concatenated (the stored form :meth:`restore` reads)."""
        return b"".join(self._stack)

    def copy(self) -> CompactRange:
        """An independent copy (the stack of hashes is shared, being immutable bytes)."""
        other = CompactRange()
        other.size = self.size
        other._stack = list(self._stack)
        return other

    def append_leaf_hash(self, hashed: bytes) -> None:
        node = hashed
        size = self.size
        while size & 1:
            node = node_hash(self._stack.pop(), node)
            size >>= 1
        self._stack.append(node)
        self.size += 1

    def append_subtree(self, hashed: bytes, leaves: int) -> None:
        """Append a perfect subtree of ``leaves`` leaves (a power of two) whose root is ``hashed``.

        The range's size must be a multiple of ``leaves`` (the subtree is
        aligned, as RFC 9162's split makes every perfect subtree); ``ValueError``
        otherwise.
        """
        if leaves < 1 or leaves & (leaves - 1) or self.size % leaves:
            raise ValueError(f"a subtree of {leaves} leaves does not fit at size {self.size}")
        node = hashed
        size = self.size // leaves
        while size & 1:
            node = node_hash(self._stack.pop(), node)
            size >>= 1
        self._stack.append(node)
        self.size += leaves

    def append(self, data: bytes) -> None:
        self.append_leaf_hash(leaf_hash(data))

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        result = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            result = node_hash(left, result)
        return result


def root_from_leaf_hashes(hashes: Iterable[bytes]) -> bytes:
    """MTH over leaves given by their leaf hashes (streamed, O(log n) memory)."""
    compact = CompactRange()
    for hashed in hashes:
        compact.append_leaf_hash(hashed)
    return compact.root()


SubtreeRoot = Callable[[int, int], bytes]
"""``subtree_root(start, end)``: MTH of the leaves ``start..end-1`` (``end`` > ``start``)."""


def _list_subtree_root(hashes: Sequence[bytes]) -> SubtreeRoot:
    def subtree_root(start: int, end: int) -> bytes:
        compact = CompactRange()
        for index in range(start, end):
            compact.append_leaf_hash(hashes[index])
        return compact.root()

    return subtree_root


def inclusion_proof_from(index: int, size: int, subtree_root: SubtreeRoot) -> list[bytes]:
    """The audit path of leaf ``index`` in a tree of ``size`` leaves (RFC 9162 §2.1.3.1).

    The leaves are not needed in memory: ``subtree_root`` computes the hash of
    each sibling subtree (at most log2(size) calls over disjoint ranges), so a
    store can stream each range with bounded memory.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
    proof: list[bytes] = []
    start, end, m = 0, size, index
    # Walk down from the root; each step records the sibling subtree's hash.
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            proof.append(subtree_root(start + k, end))
            end = start + k
        else:
            proof.append(subtree_root(start, start + k))
            start += k
            m -= k
    proof.reverse()
    return proof


def inclusion_proof(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``hashes`` (RFC 9162 §2.1.3.1)."""
    return inclusion_proof_from(index, len(hashes), _list_subtree_root(hashes))


def consistency_proof_from(old_size: int, size: int, subtree_root: SubtreeRoot) -> list[bytes]:
    """The proof that the tree of ``old_size`` leaves is a prefix of the tree of ``size``.

    RFC 9162 §2.1.4.1; ``old_size`` must be in ``1..size``; equal sizes give the
    empty proof. ``subtree_root`` is called on disjoint ranges (at most
    log2(size) + 1 of them), so the leaves can stream from a store.
    """
    if not 0 < old_size <= size:
        raise ValueError(f"no consistency proof from size {old_size} to size {size}")
    proof: list[bytes] = []
    start, end, m, whole = 0, size, old_size, True
    while m != end - start:
        n = end - start
        k = _split(n)
        if m <= k:
            proof.append(subtree_root(start + k, end))
            end = start + k
        else:
            proof.append(subtree_root(start, start + k))
            start += k
            m -= k
            whole = False
    if not whole:
        proof.append(subtree_root(start, end))
    proof.reverse()
    return proof


def consistency_proof(old_size: int, hashes: Sequence[bytes]) -> list[bytes]:
    """The proof that the tree of ``old_size`` leaves is a prefix of ``hashes``' tree.

    RFC 9162 §2.1.4.1; ``old_size`` must be in ``1..len(hashes)``; equal sizes
    give the empty proof.
    """
    return consistency_proof_from(old_size, len(hashes), _list_subtree_root(hashes))


def _check_proof_shape(proof: Sequence[bytes]) -> None:
    if len(proof) > MAX_PROOF_LENGTH:
        raise MerkleProofInvalid(f"proof of {len(proof)} hashes is longer than any valid proof")
    for position, item in enumerate(proof):
        if not isinstance(item, bytes) or len(item) != HASH_SIZE:
            raise MerkleProofInvalid(f"proof hash {position} is not {HASH_SIZE} bytes")


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) sits at ``index`` of the tree ``(size, root)``.

    RFC 9162 §2.1.3.2. Raises :class:`MerkleProofInvalid` on any failure.
    """
    if not 0 <= index < size:
        raise MerkleProofInvalid(f"leaf index {index} is outside a tree of {size} leaves")
    if len(leaf) != HASH_SIZE:
        raise MerkleProofInvalid(f"leaf hash is not {HASH_SIZE} bytes")
    if len(root) != HASH_SIZE:
        raise MerkleProofInvalid(f"root hash is not {HASH_SIZE} bytes")
    _check_proof_shape(proof)
    fn, sn = index, size - 1
    result = leaf
    for sibling in proof:
        if sn == 0:
            raise MerkleProofInvalid("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MerkleProofInvalid("inclusion proof is shorter than the tree is deep")
    if not _same(result, root):
        raise MerkleProofInvalid("inclusion proof does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that tree ``(old_size, old_root)`` is a prefix of ``(new_size, new_root)``.

    RFC 9162 §2.1.4.2. A consistency claim from the empty tree proves nothing
    and is refused; equal sizes need an empty proof and equal roots. Raises
    :class:`MerkleProofInvalid` on any failure.
    """
    if old_size < 1:
        raise MerkleProofInvalid("a consistency proof from the empty tree proves nothing")
    if new_size < old_size:
        raise MerkleProofInvalid(f"new size {new_size} is smaller than old size {old_size}")
    _check_proof_shape(proof)
    if old_size == new_size:
        if proof:
            raise MerkleProofInvalid("trees of equal size need an empty consistency proof")
        if not _same(old_root, new_root):
            raise MerkleProofInvalid("two trees of the same size have different roots")
        return
    if len(old_root) != HASH_SIZE or len(new_root) != HASH_SIZE:
        raise MerkleProofInvalid(f"root hashes must be {HASH_SIZE} bytes")
    if not proof:
        raise MerkleProofInvalid("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for item in path[1:]:
        if sn == 0:
            raise MerkleProofInvalid("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(item, fr)
            sr = node_hash(item, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, item)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MerkleProofInvalid("consistency proof is shorter than needed")
    if not _same(fr, old_root):
        raise MerkleProofInvalid("consistency proof does not lead to the old root")
    if not _same(sr, new_root):
        raise MerkleProofInvalid("consistency proof does not lead to the new root")
