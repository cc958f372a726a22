"""The log's format, sans-IO: canonical entries, the hash chain, Merkle batches and their seals.

Values in, bytes out; no files here (STYLE.md habit 1). spec/audit.md is the specification; in short:

- An entry is one JSON object on one line. Its *body* is the object without ``h``, encoded
  canonically (keys sorted, no whitespace, ASCII only, no NaN); the line is the body with
  ``,"h":"<hex>"`` inserted before the closing brace, where
  ``h = SHA-256("gvmrt-audit-entry-v1\\n" || body)``. So ``h`` covers every other byte of the line.
- Every entry has ``v`` (1), ``seq`` (0, 1, 2, ... across the whole log) and ``prev`` (the ``h`` of
  entry seq-1; 64 zeros for seq 0).
- The entries between two seals form a batch. A ``seal`` entry closes it with the Merkle root
  (RFC 9162 §2.1 tree hash) over their ``h`` values, the previous batch's root, and an Ed25519
  signature over `seal_message` (or ``"sig": null`` for an unsigned log). A seal is in the chain
  (it has seq and prev) but is not a leaf of any batch.
"""

from __future__ import annotations

import base64
import json
import json.encoder
from hashlib import sha256
from typing import Any, Callable

__all__ = ["VERSION", "ZERO", "Chain", "Entry", "Rendered", "canonical", "json_string", "json_value",
           "entry_line", "merkle_root", "inclusion_path", "root_from_path", "seal_message", "SEAL_FIELDS"]

VERSION = 1
ENTRY_DOMAIN = b"gvmrt-audit-entry-v1\n"
SEAL_DOMAIN = b"gvmrt-audit-seal-v1\n"
ZERO = "0" * 64
# The fields of a seal its signature covers (with "v"); see seal_message.
SEAL_FIELDS = ("log", "first", "last", "count", "root", "prev_root", "time", "key")

def _not_json(o: object) -> None:
    raise TypeError(f"{type(o).__name__} is not JSON")


# json's C encoder, made once: JSONEncoder.encode builds a new one per call (a third of the cost
# of encoding an entry). Arguments: markers (no cycle check: entries are trees), default, string
# encoder (ASCII only), indent, separators, sort_keys, skipkeys, allow_nan.
_encode = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, False)


# One JSON string, as `canonical` writes strings (ASCII only), for renderers.
json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def json_value(value: Any) -> str:
    """One JSON value as `canonical` writes it inside an entry (renderers' slow path)."""
    return "".join(_encode(value, 0))


def canonical(obj: dict[str, Any]) -> str:
    """The canonical text of a JSON object (spec/audit.md, Canonical form)."""
    return "".join(_encode(obj, 0))


_canonical = canonical


def entry_line(body: str) -> tuple[str, bytes]:
    """(h, the line with its newline) for a canonical body."""
    h = sha256(ENTRY_DOMAIN + body.encode()).hexdigest()
    return h, f'{body[:-1]},"h":"{h}"}}\n'.encode()


# --- Merkle tree (RFC 9162 §2.1.1: leaf = H(0x00 || d), node = H(0x01 || left || right)) ---------
#
# Built bottom-up, pairing left to right and carrying an odd last node up unchanged: for any size
# this is the same tree as RFC 9162's "split at the largest power of two smaller than n".

def _leaf(d: bytes) -> bytes:
    return sha256(b"\x00" + d).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: list[bytes]) -> str:
    """Hex root over the leaf data (each entry's h as 32 bytes); the empty tree is H("")."""
    if not leaves:
        return sha256(b"").hexdigest()
    level = [_leaf(d) for d in leaves]
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def _push(frontier: list[bytes], n: int, d: bytes) -> None:
    """Add leaf data `d`, the n-th leaf (from 1), to `frontier` (see Chain): its leaf hash, merged
    upwards with each subtree it completes."""
    node = sha256(b"\x00" + d).digest()
    while not n & 1:
        node = sha256(b"\x01" + frontier.pop() + node).digest()
        n >>= 1
    frontier.append(node)


def _frontier(leaves: list[bytes]) -> list[bytes]:
    """The roots of the perfect subtrees of the tree over `leaves`, largest first (see Chain)."""
    frontier: list[bytes] = []
    for n, d in enumerate(leaves, 1):
        _push(frontier, n, d)
    return frontier


def inclusion_path(leaves: list[bytes], index: int) -> list[str]:
    """The sibling hashes (hex, bottom-up) that lead from leaf `index` to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of {len(leaves)}")
    level = [_leaf(d) for d in leaves]
    path = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling].hex())
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return path


def root_from_path(leaf: bytes, index: int, size: int, path: list[str]) -> str | None:
    """The root that `path` leads to from leaf data `leaf` at `index` of `size`; None if the path
    has the wrong length for that position (RFC 9162 §2.1.3.2, for the tree built above)."""
    if not 0 <= index < size:
        return None
    node = _leaf(leaf)
    steps = iter(path)
    try:
        while size > 1:
            if index % 2:
                node = _node(bytes.fromhex(next(steps)), node)
            elif index + 1 < size:
                node = _node(node, bytes.fromhex(next(steps)))
            # else: the odd last node, carried up unchanged
            index, size = index // 2, (size + 1) // 2
    except (StopIteration, ValueError):
        return None
    if next(steps, None) is not None:
        return None
    return node.hex()


def seal_message(seal: dict[str, Any]) -> bytes:
    """The bytes a seal's signature covers: the domain, then the canonical object of SEAL_FIELDS."""
    return SEAL_DOMAIN + canonical({"v": VERSION, **{k: seal.get(k) for k in SEAL_FIELDS}}).encode()


def key_id(public_raw: bytes) -> str:
    """A key's short name: the first 16 hex digits of SHA-256 over its 32 raw bytes."""
    return sha256(public_raw).hexdigest()[:16]


# An entry as a caller renders it itself: called with the (seq, prev) it gets, it returns the
# canonical body (`canonical` of the same entry with v, seq and prev, byte for byte). For records
# made at a high rate with a fixed shape (the sidecar's two per request), where building a dict
# for the general encoder costs more than the rest of the append; a test holds each renderer to
# `canonical`.
Rendered = Callable[[int, str], str]
Entry = dict[str, Any] | Rendered


class Chain:
    """The writer's side of the format: numbers, links and seals entries; keeps the open batch.

    `append` returns the line to write; if the write fails, `rollback(mark)` forgets what was
    appended since `mark()` so the chain never skips a number or links to an unwritten entry.
    """

    def __init__(self, log_id: str, sign: Callable[[bytes], bytes] | None = None, key: str | None = None,
                 seq: int = 0, prev: str = ZERO, prev_root: str = ZERO) -> None:
        self.log_id = log_id
        self.sign = sign
        self.key = key
        self.seq = seq                 # the next entry's number
        self.prev = prev               # the last entry's h
        self.prev_root = prev_root     # the last sealed batch's root
        self.first = seq               # the open batch's first entry
        self.leaves: list[bytes] = []  # the open batch's h values
        # The open batch's tree so far as the roots of its perfect subtrees, largest first (a
        # compact range): a leaf costs its own hash plus, amortised, one node hash, and a seal
        # folds at most log2(n) roots. Hashing a whole batch at the seal instead took ~8 ms for
        # 4096 leaves, a stall every request in flight in the sidecar waited out. It belongs to
        # the list `_frontier_of` at its length `_covered`; anything else (a rollback, a batch
        # read back by AuditLog.resume) and it is rebuilt from `leaves`.
        self._frontier: list[bytes] = []
        self._frontier_of: list[bytes] | None = self.leaves
        self._covered = 0

    def mark(self) -> tuple[Any, ...]:
        # The list itself too: a seal replaces it rather than emptying it, so a rollback across a
        # seal gets the batch back.
        return self.seq, self.prev, self.leaves, len(self.leaves), self.prev_root, self.first

    def rollback(self, mark: tuple[Any, ...]) -> None:
        self.seq, self.prev, self.leaves, n, self.prev_root, self.first = mark
        del self.leaves[n:]

    def append(self, entry: Entry) -> bytes:
        """Number and link `entry` and return its line. A dict gains v, seq, prev and h. A
        `Rendered` entry is called with the seq and prev it gets and returns its canonical body."""
        if callable(entry):
            h, line = entry_line(entry(self.seq, self.prev))
        else:
            entry.pop("h", None)
            entry["v"], entry["seq"], entry["prev"] = VERSION, self.seq, self.prev
            h, line = entry_line(_canonical(entry))
            entry["h"] = h
        self.seq += 1
        self.prev = h
        self._add_leaf(bytes.fromhex(h))
        return line

    def _current_frontier(self) -> list[bytes]:
        """The frontier of `leaves` as they are now (rebuilt if they changed behind its back)."""
        leaves = self.leaves
        if self._frontier_of is not leaves or self._covered != len(leaves):
            self._frontier, self._frontier_of, self._covered = _frontier(leaves), leaves, len(leaves)
        return self._frontier

    def _add_leaf(self, d: bytes) -> None:
        frontier = self._current_frontier()
        self.leaves.append(d)
        self._covered = len(self.leaves)
        _push(frontier, self._covered, d)

    def root(self) -> str:
        """The open batch's Merkle root (hex), as `merkle_root(self.leaves)`."""
        if not self.leaves:
            return merkle_root([])
        frontier = self._current_frontier()
        node = frontier[-1]
        for left in reversed(frontier[:-1]):   # RFC 9162: split at the largest power of two
            node = _node(left, node)
        return node.hex()

    def seal(self, time: str) -> bytes | None:
        """Close the open batch with a seal entry; None when it is empty."""
        if not self.leaves:
            return None
        root = self.root()
        seal: dict[str, Any] = {"record": "seal", "time": time, "log": self.log_id, "first": self.first,
                                "last": self.seq - 1, "count": len(self.leaves), "root": root,
                                "prev_root": self.prev_root, "key": self.key}
        seal["sig"] = (base64.b64encode(self.sign(seal_message(seal))).decode() if self.sign is not None
                       else None)
        self.leaves = []
        self.prev_root = root
        line = self.append(seal)
        self.leaves = []               # the seal is chained but is not a leaf
        self.first = self.seq
        return line
