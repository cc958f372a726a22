"""Offline checks of a log (`gvmrt audit verify`) and of one entry's proof (`verify-proof`).

Needs only the log files (copied anywhere) and, to pin the signer, the public key. Checks, per
line: it is a whole entry line; its ``h`` matches its body (`chain.entry_line`); the body is
canonical; ``v``; ``seq`` follows the previous one; ``prev`` is the previous entry's ``h``. Per seal:
its batch is exactly the entries since the last seal, the Merkle root over their ``h`` values
matches, ``prev_root`` is the previous seal's root, the log id and key are the header's, and the
Ed25519 signature holds. After a broken link the check goes on from the line as it is, so one
edit is reported once and not as a cascade.

A torn last line (a crash mid-write) and entries after the last seal are not failures: they are
what a crash or a running monitor leaves, and the summary says so.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Iterator

from gvmrt.audit import chain
from gvmrt.audit.keys import verify_signature

__all__ = ["Problem", "Report", "verify_log", "make_proof", "verify_proof", "ProofError"]

_SUFFIX = 73        # ,"h":"<64 hex>"}\n
_DOMAIN = chain.ENTRY_DOMAIN
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON a log can hold")


# NaN, Infinity and numbers too big for a float are refused: the writer never writes them.
_decode = json.JSONDecoder(parse_constant=_no_constant).decode
MAX_PROBLEMS = 50


@dataclass
class Problem:
    file: str
    line: int
    check: str          # hash, canonical, format, chain, seal, signature, key
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.check}: {self.message}"


@dataclass
class Report:
    files: list[str]
    entries: int = 0
    batches: int = 0
    signed: int = 0
    unsigned: int = 0
    first_time: str | None = None
    last_time: str | None = None
    log_id: str | None = None
    container: str | None = None
    key: str | None = None
    pinned: str = ""            # how the signer's key was pinned, "" if it was not
    unsealed: int = 0           # entries after the last seal
    closed: bool = False
    torn: str | None = None     # "file:line (N bytes)" of a torn last line
    continues: int | None = None    # the first file continues a log from this seq
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": self.files, "entries": self.entries, "batches": self.batches,
                "signed_batches": self.signed, "unsigned_batches": self.unsigned, "first_time": self.first_time,
                "last_time": self.last_time, "log": self.log_id, "container": self.container, "key": self.key,
                "pinned": self.pinned or None, "unsealed_tail": self.unsealed, "closed": self.closed,
                "torn_tail": self.torn, "continues_from_seq": self.continues,
                "problems": [{"file": p.file, "line": p.line, "check": p.check, "message": p.message}
                             for p in self.problems], "more_problems": self.more_problems}


def _lines(paths: list[str]) -> Iterator[tuple[str, int, bytes, bool]]:
    """(file, line number, raw line, last line of the whole log?)"""
    for fi, path in enumerate(paths):
        with open(path, "rb") as f:
            prev: bytes | None = None
            n = 0
            for raw in f:
                if prev is not None:
                    yield path, n, prev, False
                prev = raw
                n += 1
            if prev is not None:
                yield path, n, prev, fi == len(paths) - 1


Parsed = tuple[str, int, "int | None", bool, "dict[str, Any] | None", "str | None", "str | None"]


def _parsed(paths: list[str]) -> Iterator[Parsed]:
    """(file, line, torn length or None, last line of the log?, entry, h, problem) per line."""
    for file, n, raw, last in _lines(paths):
        if not raw.endswith(b"\n"):
            yield file, n, len(raw), last, None, None, None
            continue
        obj, h, problem = parse_line(raw)
        yield file, n, None, last, obj, h, problem


# --- parallel parsing ------------------------------------------------------------------------------
#
# Checking a line's hash and canonical form is ~90 % of verify's time and needs nothing from the
# other lines; the links, batches and signatures need order but little time. So worker processes
# parse newline-aligned pieces of the files and the main one walks the results in order.

PIECE = 4 << 20
_KEEP = ("seq", "prev", "record", "time", "v")


def _pieces(paths: list[str]) -> Iterator[tuple[str, int, int, int, bool]]:
    """(file, offset, length, first line number, holds the log's last line?) per piece."""
    for fi, path in enumerate(paths):
        size = os.path.getsize(path)
        offset, line = 0, 1
        with open(path, "rb") as f:
            while offset < size:
                f.seek(offset)
                block = f.read(PIECE)
                cut = block.rfind(b"\n") + 1 if offset + len(block) < size else len(block)
                if cut == 0:                      # a line longer than a piece: take it whole
                    rest = f.read()
                    block += rest
                    cut = len(block)
                last = fi == len(paths) - 1 and offset + cut >= size
                yield path, offset, cut, line, last
                line += block.count(b"\n", 0, cut)
                offset += cut


def _parse_piece(piece: tuple[str, int, int, int, bool]) -> list[Parsed]:
    path, offset, length, line, last = piece
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    out: list[Parsed] = []
    lines = data.split(b"\n")
    tail = lines.pop()                          # b"" when the piece ends with a newline
    for i, body in enumerate(lines):
        obj, h, problem = parse_line(body + b"\n")
        if obj is not None and obj.get("record") not in ("log", "segment", "seal"):
            obj = {k: obj[k] for k in _KEEP if k in obj}    # what the ordered walk reads
        out.append((path, line + i, None, False, obj, h, problem))
    if tail:
        out.append((path, line + len(lines), len(tail), last, None, None, None))
    return out


def _parsed_parallel(paths: list[str], workers: int) -> Iterator[Parsed]:
    import multiprocessing
    # fork: workers are copies of this (single-threaded) process. Not spawn or forkserver: they
    # re-import the main module, which for the gvmrt launcher is the whole CLI again.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for results in pool.imap(_parse_piece, _pieces(paths)):
            yield from results


def _unhex(h: str) -> bytes:
    """The 32 bytes of a hex h; b"" for a damaged one (already reported by the hash check)."""
    try:
        return bytes.fromhex(h)
    except ValueError:
        return b""


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(entry, its h, problem) of one line: checks the hash and the canonical form."""
    if len(raw) < _SUFFIX + 2 or raw[-_SUFFIX:-_SUFFIX + 6] != b',"h":"' or raw[-3:] != b'"}\n':
        return None, None, "format: not an entry line (no trailing h field)"
    h = raw[-_SUFFIX + 6:-3].decode("ascii", "replace")
    body = raw[:-_SUFFIX] + b"}"
    try:
        obj = _decode(body.decode())        # the body alone: h is taken from its fixed place
    except (ValueError, RecursionError) as exc:     # UnicodeDecodeError included
        return None, h, f"format: not JSON ({str(exc)[:200]})"
    if obj.__class__ is not dict:
        return None, h, "format: not a JSON object"
    if sha256(_DOMAIN + body).hexdigest() != h:
        return obj, h, "hash: the entry does not match its h (it was altered after it was written)"
    try:
        canonical = "h" not in obj and chain.canonical(obj).encode() == body
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
        canonical = False
    if not canonical:
        return obj, h, "canonical: the entry is not in canonical form (a duplicate key or re-encoded field)"
    obj["h"] = h
    return obj, h, None


class _Verifier:
    def __init__(self, paths: list[str], pubkey: tuple[bytes, str] | None, pin: tuple[bytes, str, str] | None,
                 whole: bool, container: str | None):
        self.r = Report(files=list(paths))
        self.pubkey = pubkey            # --pubkey: (raw, key id)
        self.pin = pin                  # the host's own public key: (raw, key id, path)
        self.whole = whole              # the whole log: it must start with its header (seq 0)
        self.container = container      # the container the log must be of (verify ID)
        self.file = ""                  # the file being read, how many files so far, at its first line?
        self.files_seen = 0
        self.file_start = False
        self.segment = 0
        self.header_pub: bytes | None = None
        self.seq: int | None = None     # the expected next seq
        self.prev: str | None = None    # the last entry's h
        self.prev_at = ("", 0)
        self.leaves: list[bytes] = []
        self.first: int | None = None   # the open batch's first seq
        self.root: str | None = None    # the last seal's root (None: unknown, a continued segment)
        self.last_kind = ""
        self.closing = False            # the last entry before a seal was the close record

    @property
    def prev_line(self) -> str:
        file, n = self.prev_at
        return f"{os.path.basename(file)} line {n}"

    def problem(self, file: str, line: int, check: str, message: str) -> None:
        if len(self.r.problems) < MAX_PROBLEMS:
            self.r.problems.append(Problem(os.path.basename(file), line, check, message))
        else:
            self.r.more_problems += 1

    def run(self, paths: list[str], workers: int = 1) -> Report:
        parsed = _parsed_parallel(paths, workers) if workers > 1 else _parsed(paths)
        for file, n, torn, last, obj, h, problem in parsed:
            if file != self.file:
                self.file, self.files_seen = file, self.files_seen + 1
                self.file_start = True
            if torn is not None:
                if last:
                    self.r.torn = f"{os.path.basename(file)}:{n} ({torn} bytes)"
                else:
                    self.problem(file, n, "format", "a line without its newline in the middle of the log "
                                                    "(a segment was cut short)")
                continue
            if problem is not None:
                check, _, message = problem.partition(": ")
                self.problem(file, n, check, message)
                if obj is None or h is None:
                    continue
            self.entry(file, n, obj, h)
            self.file_start = False
        r = self.r
        r.unsealed = len(self.leaves)
        r.closed = self.last_kind == "seal" and self.closing
        if self.pubkey is not None and r.key is None:
            self.problem(paths[0], 1, "key", f"--pubkey names key {self.pubkey[1]} but the log is unsigned")
        if self.pubkey is not None:
            r.pinned = f"--pubkey (key {self.pubkey[1]})"
        elif self.pin is not None and r.key == self.pin[1] and self.header_pub == self.pin[0]:
            r.pinned = f"the host's key {self.pin[2]}"
        if self.container is not None and r.container != self.container:
            self.problem(paths[0], 1, "chain", f"the log of container {r.container!r}, not of {self.container!r}")
        return r

    def entry(self, file: str, n: int, obj: dict[str, Any], h: str) -> None:
        r = self.r
        seq, kind = obj.get("seq"), obj.get("record")
        if obj.get("v").__class__ is not int or obj.get("v") != chain.VERSION:
            self.problem(file, n, "format", f"version {obj.get('v')!r}; this gvmrt reads version {chain.VERSION}")
        if self.file_start and self.files_seen > 1 and kind != "segment":
            self.problem(file, n, "chain", f"a {kind!r} entry where a segment file starts with its segment header")
        if kind == "log" and seq != 0:
            self.problem(file, n, "chain", f"a log header at seq {seq}: only entry 0 is the log's header")
        if seq.__class__ is not int:
            self.problem(file, n, "format", "no integer seq")
            return
        if seq == self.seq and obj.get("prev") == self.prev:
            pass                                # the common case, first
        elif self.seq is None:
            # The first line: a log's header (seq 0), or a rotated segment's first entry.
            if seq != 0:
                r.continues = seq
                if self.whole:
                    self.problem(file, n, "chain", f"the log starts at seq {seq}: its beginning (seq 0, the log "
                                                   "header) is missing; verify a rotated segment alone by naming "
                                                   "its file (ID.jsonl.N)")
                elif kind != "segment":
                    self.problem(file, n, "chain", f"the log starts at seq {seq} with a {kind!r} entry; "
                                                   "a log or segment starts with its header")
            elif kind != "log":
                self.problem(file, n, "chain", f"entry 0 is a {kind!r} entry, not the log's header")
            elif obj.get("prev") != chain.ZERO:
                self.problem(file, n, "chain", "the first entry's prev is not zero")
            self.first = seq
        else:
            if seq != self.seq:
                what = (f"entries seq {self.seq}..{seq - 1} are missing" if seq > self.seq else
                        f"seq {seq} after seq {self.seq - 1}: entries were reordered or repeated")
                self.problem(file, n, "chain", f"{what} (between {self.prev_line} and line {n})")
            elif obj.get("prev") != self.prev:
                self.problem(file, n, "chain", f"prev is not the h of the entry before ({self.prev_line}): "
                                               f"that entry was replaced, or one was inserted or removed "
                                               f"before line {n}")
        self.seq, self.prev, self.prev_at = seq + 1, h, (file, n)
        t = obj.get("time")
        if t.__class__ is str:
            if r.first_time is None:
                r.first_time = t
            r.last_time = t
        r.entries += 1
        self.last_kind = kind or ""
        if kind == "seal":
            self.seal(file, n, obj)
            return
        self.closing = kind == "close"
        if kind in ("log", "segment"):
            self.header(file, n, obj, kind)
        self.leaves.append(_unhex(h))

    def header(self, file: str, n: int, obj: dict[str, Any], kind: str) -> None:
        r = self.r
        if kind == "segment":
            number = obj.get("segment")
            if number.__class__ is not int or (self.segment and number != self.segment + 1):
                self.problem(file, n, "chain", f"segment {number!r} follows segment {self.segment}")
            self.segment = number if number.__class__ is int else self.segment
        else:
            self.segment = 1
        if r.log_id is None:
            r.log_id, r.container, r.key = obj.get("log"), obj.get("container"), obj.get("key")
            pub = obj.get("pubkey")
            try:
                self.header_pub = base64.b64decode(pub, validate=True) if pub else None
            except (ValueError, TypeError):
                self.problem(file, n, "key", "the header's pubkey is not base64")
            if self.header_pub is not None and chain.key_id(self.header_pub) != r.key:
                self.problem(file, n, "key", f"the header's pubkey is key {chain.key_id(self.header_pub)}, "
                                             f"not {r.key}")
            if self.pubkey is not None and r.key is not None and r.key != self.pubkey[1]:
                self.problem(file, n, "key", f"the log is signed by key {r.key}, not by the --pubkey key "
                                             f"{self.pubkey[1]}")
        elif obj.get("log") != r.log_id:
            self.problem(file, n, "chain", f"a {kind} header of log {obj.get('log')}, inside log {r.log_id}")

    def seal(self, file: str, n: int, s: dict[str, Any]) -> None:
        r = self.r
        r.batches += 1
        count = len(self.leaves)
        if s.get("log") != r.log_id:
            self.problem(file, n, "seal", f"seals log {s.get('log')}, not this log ({r.log_id})")
        if (s.get("first"), s.get("last"), s.get("count")) != (self.first, s.get("seq", 0) - 1, count):
            self.problem(file, n, "seal", f"covers seq {s.get('first')}..{s.get('last')} ({s.get('count')} "
                                          f"entries), but the batch since the last seal is seq "
                                          f"{self.first}..{s.get('seq', 0) - 1} ({count})")
        root = chain.merkle_root(self.leaves)
        if s.get("root") != root:
            self.problem(file, n, "seal", "the Merkle root does not match the batch's entries (an entry of "
                                          "seq {}..{} or the root was altered)".format(self.first, s.get("seq", 0) - 1))
        if self.root is None and self.r.continues is None and s.get("prev_root") != chain.ZERO:
            self.problem(file, n, "seal", "the first seal's prev_root is not zero")
        if self.root is not None and s.get("prev_root") != self.root:
            self.problem(file, n, "seal", "prev_root is not the previous seal's root (a batch was removed "
                                          "or replaced)")
        self.signature(file, n, s)
        self.root = s.get("root") if isinstance(s.get("root"), str) else root
        self.leaves = []
        self.first = s.get("seq", 0) + 1

    def signature(self, file: str, n: int, s: dict[str, Any]) -> None:
        r = self.r
        sig, key = s.get("sig"), s.get("key")
        if sig is None:
            r.unsigned += 1
            if r.key is not None or self.pubkey is not None:
                self.problem(file, n, "signature", "an unsigned seal in a signed log")
            return
        r.signed += 1
        if key != r.key:
            self.problem(file, n, "signature", f"signed by key {key}; this log's key is {r.key}")
            return
        pub = self.pubkey[0] if self.pubkey is not None else self.header_pub
        if pub is None:
            self.problem(file, n, "signature", "no public key to check it with (the log's header is in its first "
                                               "segment): pass --pubkey")
            return
        try:
            raw_sig = base64.b64decode(sig, validate=True)
        except (ValueError, TypeError):
            raw_sig = b""
        try:
            message = chain.seal_message(s)
        except (ValueError, TypeError):
            message = b""
        if not verify_signature(pub, raw_sig, message):
            self.problem(file, n, "signature", f"the Ed25519 signature does not verify with key "
                                               f"{chain.key_id(pub)}")


def host_pin() -> tuple[bytes, str, str] | None:
    """The host's own public key (from `gvmrt audit keygen`), if there is one: logs it signed are pinned."""
    from gvmrt.audit.keys import default_key_path, load_public, public_path
    path = public_path(default_key_path())
    if not os.path.exists(path):
        return None
    try:
        raw, kid = load_public(path)
    except Exception:  # noqa: BLE001 - an unreadable pin is no pin
        return None
    return raw, kid, path


def verify_log(paths: list[str], pubkey: tuple[bytes, str] | None = None, use_host_pin: bool = True,
               container: str | None = None, workers: int | None = None) -> Report:
    """Check the log made of `paths` (its segment files in order). A single rotated segment
    (``ID.jsonl.N``) may be checked alone, as a continuation; any other log must start at its
    header. `container`: the id the log must belong to (when it was found by id)."""
    from gvmrt.audit.read import is_part
    whole = not (len(paths) == 1 and is_part(paths[0]))
    if workers is None:
        # Processes pay off from a few tens of megabytes (~50,000 entries) on.
        big = sum(os.path.getsize(p) for p in paths) > 32 << 20
        workers = min(os.cpu_count() or 1, 4) if big else 1
    return _Verifier(paths, pubkey, host_pin() if use_host_pin and pubkey is None else None, whole,
                     container).run(paths, workers)


# --- proofs ------------------------------------------------------------------------------

PROOF_FORMAT = "gvmrt-audit-proof-v1"


class ProofError(Exception):
    pass


def make_proof(paths: list[str], ref: str) -> dict[str, Any]:
    """One entry (by seq, or the decision record of a request id) with its Merkle inclusion path
    and the seal of its batch, as a self-contained JSON object."""
    # A request id is 16 hex digits (possibly all decimal ones); anything shorter that is a
    # number is a seq.
    want_seq = int(ref) if ref.isdigit() and len(ref) < 16 else None
    header: dict[str, Any] | None = None
    batch: list[tuple[bytes, bytes]] = []      # (h, raw line)
    found: int | None = None                   # index in batch
    for file, n, raw, _last in _lines(paths):
        if not raw.endswith(b"\n"):
            continue
        obj, h, problem = parse_line(raw)
        if obj is None or h is None:
            continue
        if problem is not None:
            raise ProofError(f"{os.path.basename(file)}:{n}: {problem}; run `gvmrt audit verify` first")
        kind = obj.get("record")
        if kind in ("log", "segment") and obj.get("pubkey") is not None:
            header = obj
        if kind == "seal":
            if found is not None:
                path = chain.inclusion_path([b for b, _ in batch], found)
                return {"format": PROOF_FORMAT, "entry": batch[found][1].decode().rstrip("\n"),
                        "leaf_index": found, "path": path, "seal": raw.decode().rstrip("\n"),
                        "pubkey": header.get("pubkey") if header else None}
            batch = []
            continue
        # A request id (16 hex digits, maybe all digits) or a seq number.
        if found is None and (obj.get("seq") == want_seq if want_seq is not None else
                              kind == "decision" and obj.get("request_id") == ref):
            found = len(batch)
        batch.append((bytes.fromhex(h), raw))
    if found is not None:
        raise ProofError(f"entry {ref} is not sealed yet: its batch is sealed within a second while the "
                         "monitor runs, or at close")
    raise ProofError(f"no entry {ref!r} in the log (give a seq number or a request id)")


def _is_int(v: Any) -> bool:
    return v.__class__ is int


def verify_proof(proof: dict[str, Any], pubkey: tuple[bytes, str] | None) -> tuple[dict[str, Any], str]:
    """Check a proof alone; (the entry, how the signer was pinned). Raises ProofError naming the check."""
    if not isinstance(proof, dict) or proof.get("format") != PROOF_FORMAT:
        raise ProofError(f"not a proof (format {PROOF_FORMAT!r} expected)")
    try:
        entry_raw = proof["entry"].encode() + b"\n"
        seal_raw = proof["seal"].encode() + b"\n"
        index, path = proof["leaf_index"], proof["path"]
    except (KeyError, AttributeError, TypeError, UnicodeEncodeError):
        raise ProofError("a proof needs entry and seal (entry lines), leaf_index and path") from None
    entry, h, problem = parse_line(entry_raw)
    if problem or entry is None or h is None:
        raise ProofError(f"entry: {problem}")
    seal, _sh, problem = parse_line(seal_raw)
    if problem or seal is None:
        raise ProofError(f"seal: {problem}")
    if seal.get("record") != "seal":
        raise ProofError("seal: not a seal entry")
    first, count = seal.get("first"), seal.get("count")
    if not (_is_int(index) and _is_int(first) and _is_int(count) and isinstance(path, list)
            and all(isinstance(p, str) and re.fullmatch(r"[0-9a-f]{64}", p) for p in path)):
        raise ProofError("leaf_index, the seal's first and count must be integers and path a list of 64-digit "
                         "lowercase hex strings")
    if entry.get("seq") != first + index or not 0 <= index < count:
        raise ProofError(f"entry seq {entry.get('seq')} is not leaf {index} of the batch of {count} from seq {first}")
    root = chain.root_from_path(bytes.fromhex(h), index, count, path)
    if root is None or root != seal.get("root"):
        raise ProofError("inclusion: the path does not lead from the entry to the seal's Merkle root")
    if seal.get("sig") is None:
        if pubkey is not None:
            raise ProofError(f"signature: the seal is unsigned, but --pubkey asks for key {pubkey[1]}")
        return entry, "unsigned: the seal has no signature (the log was unsigned); nothing pins it"
    if pubkey is not None:
        pub, how = pubkey[0], f"--pubkey (key {pubkey[1]})"
        if seal.get("key") != pubkey[1]:
            raise ProofError(f"signature: the seal is signed by key {seal.get('key')}, not by the --pubkey key {pubkey[1]}")
    else:
        try:
            pub = base64.b64decode(proof.get("pubkey") or "", validate=True)
        except (ValueError, TypeError):
            pub = b""
        how = "the key inside the proof (not pinned: pass --pubkey)"
        if chain.key_id(pub) != seal.get("key"):
            raise ProofError("signature: the proof's pubkey is not the seal's key")
    try:
        sig = base64.b64decode(seal["sig"], validate=True)
        message = chain.seal_message(seal)
    except (ValueError, TypeError):
        sig, message = b"", b""
    if not verify_signature(pub, sig, message):
        raise ProofError("signature: the seal's Ed25519 signature does not verify")
    return entry, f"{how}; log {seal.get('log')}"
