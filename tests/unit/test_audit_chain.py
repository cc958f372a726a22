"""The audit log's format and its verifier: Merkle paths, the writer's chain, and the tamper battery
of issue 5 (each tampering detected, with the line named)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gvmrt.audit import chain
from gvmrt.audit.keys import generate, load_private, load_public
from gvmrt.audit.read import segments
from gvmrt.audit.verify import ProofError, make_proof, verify_log, verify_proof
from gvmrt.audit.writer import AuditLog

# --- Merkle tree against RFC 9162's recursive definition -------------------------------------


def _rfc_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return sha256(b"").digest()
    if len(leaves) == 1:
        return sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return sha256(b"\x01" + _rfc_root(leaves[:k]) + _rfc_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", list(range(0, 34)) + [100, 257])
def test_merkle_root_is_rfc9162s_and_every_path_leads_to_it(n: int) -> None:
    leaves = [sha256(str(i).encode()).digest() for i in range(n)]
    root = chain.merkle_root(leaves)
    assert root == _rfc_root(leaves).hex()
    for i in range(n):
        path = chain.inclusion_path(leaves, i)
        assert chain.root_from_path(leaves[i], i, n, path) == root
        # Another leaf, index or size does not lead there.
        assert chain.root_from_path(sha256(b"forged").digest(), i, n, path) != root
        if n > 1:
            assert chain.root_from_path(leaves[i], (i + 1) % n, n, path) != root
        assert chain.root_from_path(leaves[i], i, n, path + [root]) is None


def test_the_chains_running_root_is_the_batchs_merkle_root_at_every_size() -> None:
    c = chain.Chain("0" * 32)
    for n in range(1, 300):
        c.append({"record": "x", "n": n})
        assert c.root() == chain.merkle_root(c.leaves) == _rfc_root(c.leaves).hex(), n


@given(st.lists(st.sampled_from(["append", "mark", "rollback", "seal"]), max_size=60))
@settings(max_examples=300, deadline=None)
def test_the_running_root_survives_rollbacks_and_seals(ops: list[str]) -> None:
    """Whatever a failed write rolls back (across a seal too), the next seal's root is the one
    over the leaves the batch really has."""
    c = chain.Chain("0" * 32)
    marks = []
    for i, op in enumerate(ops):
        if op == "append":
            c.append({"record": "x", "i": i})
        elif op == "mark":
            marks.append(c.mark())
        elif op == "rollback" and marks:
            c.rollback(marks.pop())
        elif op == "seal":
            c.seal("2026-11-26T00:00:00.000Z")
        assert c.root() == chain.merkle_root(c.leaves)
    c.append({"record": "x", "i": -1})
    leaves = list(c.leaves)
    seal = json.loads(c.seal("2026-11-26T00:00:00.000Z") or b"")
    assert seal["root"] == chain.merkle_root(leaves) and seal["count"] == len(leaves)


def test_a_rollback_across_a_seal_to_a_batch_of_the_same_size_gets_its_own_root() -> None:
    # append_many with a small batch: mark, fill and seal batch A, start batch B, and the write
    # fails when B is as long as A was at the mark; the rollback brings A back.
    c = chain.Chain("0" * 32)
    for i in range(3):
        c.append({"record": "a", "i": i})
    mark = c.mark()
    c.append({"record": "a", "i": 3})
    c.seal("2026-11-26T00:00:00.000Z")
    for i in range(3):
        c.append({"record": "b", "i": i})
    c.rollback(mark)
    assert len(c.leaves) == 3 and c.root() == chain.merkle_root(c.leaves)


def test_an_entry_that_cannot_be_encoded_leaves_the_chain_as_it_was(tmp_path: Path) -> None:
    """Only a failed write used to roll the chain back: an entry that raised while being encoded,
    after others of the same append_many were chained, left the chain counting entries that were
    never written, and every later line linked to them."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, container="c1")
    with pytest.raises(TypeError):
        log.append_many([{"record": "x", "i": 1}, {"record": "x", "bad": object()}])
    with pytest.raises(TypeError):
        log.append({"record": "x", "bad": object()})
    log.append({"record": "x", "i": 2})
    log.close()
    report = verify_log([str(path)], use_host_pin=False)
    assert report.ok, report.problems
    assert [json.loads(line).get("i") for line in path.read_text().splitlines()][1] == 2


# --- a signed log to tamper with ------------------------------------------------------------

def _write_log(path: Path, key: str | None, n: int = 40, batch: int = 8, **kw: Any) -> AuditLog:
    async def main() -> AuditLog:
        log = AuditLog(path, container="c1", signer=load_private(key) if key else None, batch_max=batch, **kw)
        log.append({"record": "lifecycle", "event": "created", "time": "2026-11-26T00:00:00.000Z"})
        for i in range(n):
            decision = "deny" if i % 5 == 0 else "allow"
            rid = f"{i:016d}" if i == 7 else f"r{i:04d}"      # request ids may be all digits
            seq = log.append({"record": "decision", "time": f"2026-11-26T00:00:{i:02d}.000Z", "request_id": rid,
                              "method": "GET", "host": f"h{i % 3}.example", "port": 443, "path": f"/items/{i}",
                              "rule": "r-deny" if decision == "deny" else "r-allow", "decision": decision,
                              "status": 403 if decision == "deny" else None})
            if decision == "deny":
                await log.durable(seq)
        log.close()
        return log
    return asyncio.run(main())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("keys")
    generate(str(d / "a.pem"))
    generate(str(d / "b.pem"))
    return {"a": str(d / "a.pem"), "b": str(d / "b.pem"), "a.pub": str(d / "a.pub.pem"), "b.pub": str(d / "b.pub.pem")}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, str]) -> bytes:
    path = tmp_path_factory.mktemp("log") / "c1.jsonl"
    _write_log(path, keys["a"])
    return path.read_bytes()


def _verify(tmp_path: Path, data: bytes, pub: str | None = None) -> Any:
    """verify_log in one process, and again in worker processes over small pieces (their
    boundaries fall mid-batch and mid-problem): the two reports must be the same."""
    from gvmrt.audit import verify
    p = tmp_path / "t.jsonl"
    p.write_bytes(data)
    key = load_public(pub) if pub else None
    one = verify_log([str(p)], key, use_host_pin=False, workers=1)
    piece, verify.PIECE = verify.PIECE, 997
    try:
        many = verify_log([str(p)], key, use_host_pin=False, workers=2)
    finally:
        verify.PIECE = piece
    assert many.to_json() == one.to_json()
    return one


def _lines_of(problems: Any) -> set[int]:
    return {p.line for p in problems}


def test_a_written_log_verifies(tmp_path: Path, good: bytes, keys: dict[str, str]) -> None:
    r = _verify(tmp_path, good, keys["a.pub"])
    assert r.ok, r.problems
    assert r.entries == len(good.splitlines()) and r.closed and r.unsealed == 0 and r.torn is None
    assert r.batches == r.signed >= 6 and r.unsigned == 0 and r.pinned.startswith("--pubkey")
    # Every line is canonical JSON with h last, and each seal covers the entries since the last.
    for line in good.splitlines():
        obj = json.loads(line)
        assert list(obj)[-1] == "h"


def test_an_unsigned_log_verifies_and_says_so(tmp_path: Path, keys: dict[str, str]) -> None:
    _write_log(tmp_path / "u.jsonl", None)
    r = verify_log([str(tmp_path / "u.jsonl")], use_host_pin=False)
    assert r.ok and r.key is None and r.signed == 0 and r.unsigned == r.batches > 0
    # --pubkey on an unsigned log is a failure: the auditor expected a signer.
    r = verify_log([str(tmp_path / "u.jsonl")], load_public(keys["a.pub"]))
    assert not r.ok and any(p.check == "key" for p in r.problems)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bit_flip_anywhere_is_caught_on_its_line(tmp_path: Path, good: bytes, data: st.DataObject) -> None:
    lines = good.splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    pos = data.draw(st.integers(0, len(lines[i]) - 2), label="byte")     # not the newline itself
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(lines[i])
    flipped[pos] ^= 1 << bit
    tampered = b"".join(lines[:i]) + bytes(flipped) + b"".join(lines[i + 1:])
    r = _verify(tmp_path, tampered)
    assert not r.ok
    assert i + 1 in _lines_of(r.problems), (i + 1, [str(p) for p in r.problems])


@pytest.mark.parametrize("field", ["host", "path", "rule", "decision", "request_id", "seq", "prev", "time"])
def test_each_field_of_a_decision_is_covered(tmp_path: Path, good: bytes, field: str) -> None:
    lines = good.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if b'"record":"decision"' in line)
    obj = json.loads(lines[i])
    h = obj.pop("h")
    obj[field] = (obj[field] + 1) if isinstance(obj[field], int) else (str(obj[field])[:-1] + "X")
    # Re-encoded canonically with the old h: the hash check names the line.
    lines[i] = chain.canonical(obj)[:-1].encode() + b',"h":"' + h.encode() + b'"}\n'
    r = _verify(tmp_path, b"".join(lines))
    assert (i + 1, "hash") in {(p.line, p.check) for p in r.problems}
    # seq and prev also break the links there (and, for seq, to the next line); nothing beyond.
    assert _lines_of(r.problems) <= {i + 1, i + 2}


def test_a_deleted_entry_is_a_gap_named_by_its_neighbours(tmp_path: Path, good: bytes) -> None:
    lines = good.splitlines(keepends=True)
    del lines[10]
    r = _verify(tmp_path, b"".join(lines))
    chain_problems = [p for p in r.problems if p.check == "chain"]
    assert chain_problems and chain_problems[0].line == 11 and "missing" in chain_problems[0].message
    assert "line 10" in chain_problems[0].message


def test_two_swapped_entries_are_caught(tmp_path: Path, good: bytes) -> None:
    lines = good.splitlines(keepends=True)
    lines[5], lines[6] = lines[6], lines[5]
    r = _verify(tmp_path, b"".join(lines))
    assert {6, 7} <= _lines_of(p for p in r.problems if p.check == "chain")


def test_a_forged_entry_with_a_consistent_hash_is_caught(tmp_path: Path, good: bytes) -> None:
    lines = good.splitlines(keepends=True)
    prev = json.loads(lines[4])
    forged = {"record": "decision", "time": prev["time"], "request_id": "forged", "method": "GET",
              "host": "evil.example", "port": 443, "path": "/", "rule": "r-allow", "decision": "allow",
              "status": 200, "v": 1, "seq": prev["seq"] + 1, "prev": prev["h"]}
    _h, line = chain.entry_line(chain.canonical(forged))
    lines.insert(5, line)
    r = _verify(tmp_path, b"".join(lines))
    assert not r.ok
    # The forged line itself checks out; the entry after it does not link, and its batch's root fails.
    assert 6 not in _lines_of(r.problems)
    assert 7 in _lines_of(p for p in r.problems if p.check == "chain")
    assert any(p.check == "seal" and "Merkle root" in p.message for p in r.problems)


def _rewrite(obj: dict[str, Any]) -> bytes:
    obj = {k: v for k, v in obj.items() if k != "h"}
    return chain.entry_line(chain.canonical(obj))[1]


def test_an_overwritten_merkle_root_is_caught(tmp_path: Path, good: bytes, keys: dict[str, str]) -> None:
    lines = good.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if b'"record":"seal"' in line)
    seal = json.loads(lines[i])
    seal["root"] = sha256(b"another batch").hexdigest()
    lines[i] = _rewrite(seal)               # a self-consistent h, even
    r = _verify(tmp_path, b"".join(lines), keys["a.pub"])
    checks = {(p.line, p.check) for p in r.problems}
    assert (i + 1, "seal") in checks and (i + 1, "signature") in checks


def test_deny_turned_into_allow_everywhere_is_caught_on_every_line(tmp_path: Path, good: bytes) -> None:
    lines = good.splitlines(keepends=True)
    denied = [n + 1 for n, line in enumerate(lines) if b'"decision":"deny"' in line]
    tampered = good.replace(b'"decision":"deny"', b'"decision":"allow"')
    r = _verify(tmp_path, tampered)
    assert len(denied) >= 5 and _lines_of(p for p in r.problems if p.check == "hash") == set(denied)


def test_a_torn_tail_is_reported_not_failed(tmp_path: Path, good: bytes) -> None:
    cut = good[:len(good) - 37]              # mid-line
    r = _verify(tmp_path, cut)
    assert r.ok and r.torn is not None and not r.closed
    n = len(cut.splitlines())
    assert r.torn.startswith(f"t.jsonl:{n} ")
    # Cut at a line boundary inside a batch: an open tail of unsealed entries, also not a failure.
    lines = good.splitlines(keepends=True)
    r = _verify(tmp_path, b"".join(lines[:12]))
    assert r.ok and r.unsealed > 0 and not r.closed and r.torn is None


def _forge_from(objs: list[dict[str, Any]], start: int, signer: Any) -> bytes:
    """What an attacker holding another key can do: rewrite everything from line `start` on with
    consistent links, Merkle roots and signatures of their own."""
    leaves: list[bytes] = []
    first = 0
    prev_root = chain.ZERO
    for n, o in enumerate(objs):
        if n >= start:
            o["prev"] = objs[n - 1]["h"]
            if o["record"] == "seal":
                o.update(first=first, last=o["seq"] - 1, count=len(leaves), root=chain.merkle_root(leaves),
                         prev_root=prev_root, key=signer.key)
                o["sig"] = base64.b64encode(signer.sign(chain.seal_message(o))).decode()
            o["h"] = chain.entry_line(chain.canonical({k: v for k, v in o.items() if k != "h"}))[0]
        if o["record"] == "seal":
            leaves, first, prev_root = [], o["seq"] + 1, o["root"]
        else:
            leaves.append(bytes.fromhex(o["h"]))
    return b"".join(_rewrite(o) for o in objs)


def test_a_batch_signed_by_another_key_is_caught(tmp_path: Path, good: bytes, keys: dict[str, str]) -> None:
    # The attacker holds key b: changes a decision in the second batch and rebuilds everything
    # after it, every root and signature, consistently with b. Without --pubkey the change of
    # signer is seen on each seal of theirs; with it, too.
    lines = good.splitlines(keepends=True)
    objs = [json.loads(line) for line in lines]
    seals = [n for n, o in enumerate(objs) if o["record"] == "seal"]
    victim = next(n for n in range(seals[0] + 1, seals[1]) if objs[n].get("decision") == "deny")
    objs[victim]["decision"] = "allow"
    tampered = _forge_from(objs, victim, load_private(keys["b"]))
    forged_seals = [n + 1 for n in seals if n > victim]
    r = _verify(tmp_path, tampered)
    assert [(p.line, p.check) for p in r.problems] == [(n, "signature") for n in forged_seals]
    assert "this log's key is" in r.problems[0].message
    r = _verify(tmp_path, tampered, keys["a.pub"])
    assert {(n, "signature") for n in forged_seals} <= {(p.line, p.check) for p in r.problems}
    # The same rewrite with the right key is undetectable: that is what the key protects.
    objs = [json.loads(line) for line in lines]
    objs[victim]["decision"] = "allow"
    assert _verify(tmp_path, _forge_from(objs, victim, load_private(keys["a"])), keys["a.pub"]).ok


def test_a_whole_log_rewritten_under_another_key_fails_against_the_pinned_key(
        tmp_path: Path, keys: dict[str, str]) -> None:
    _write_log(tmp_path / "b.jsonl", keys["b"])
    assert verify_log([str(tmp_path / "b.jsonl")], use_host_pin=False).ok   # consistent on its own
    r = verify_log([str(tmp_path / "b.jsonl")], load_public(keys["a.pub"]))
    assert not r.ok and r.problems[0].line == 1 and r.problems[0].check == "key"


# --- rotation, durability ---------------------------------------------------------------------

def test_rotation_keeps_one_chain_across_files(tmp_path: Path, keys: dict[str, str]) -> None:
    log = _write_log(tmp_path / "r.jsonl", keys["a"], n=300, batch=1000, max_segment_bytes=8192)
    files = segments(str(tmp_path / "r.jsonl"))
    assert len(files) == log.segment >= 4
    assert all(os.path.getsize(f) < 8192 + 2048 for f in files)
    r = verify_log(files, load_public(keys["a.pub"]))
    assert r.ok and r.closed, r.problems
    # Each file ends sealed and starts with a header: one alone verifies, as a continuation.
    alone = verify_log([files[2]], load_public(keys["a.pub"]))
    assert alone.ok and alone.continues is not None and alone.continues > 0, alone.problems
    # A middle file missing is a gap, named.
    r = verify_log(files[:2] + files[3:], load_public(keys["a.pub"]))
    assert not r.ok and "missing" in r.problems[0].message


def test_durable_appends_cost_one_fsync_each_and_share_them_when_concurrent(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        log = AuditLog(tmp_path / "d.jsonl", container="c")
        base = log.fsyncs
        for i in range(20):
            await log.durable(log.append({"record": "decision", "n": i}))
        single = log.fsyncs - base
        base = log.fsyncs

        async def one(i: int) -> None:
            await log.durable(log.append({"record": "decision", "n": i}))
        await asyncio.gather(*(one(i) for i in range(200)))
        shared = log.fsyncs - base
        log.close()
        return single, shared
    single, shared = asyncio.run(main())
    assert single <= 2 * 20
    assert shared <= 10, shared        # 200 concurrent waiters, a handful of group commits


def test_a_closed_log_cannot_be_appended_to_by_reopening(tmp_path: Path) -> None:
    AuditLog(tmp_path / "x.jsonl", container="c").close()
    from gvmrt.audit.writer import AuditError
    with pytest.raises(AuditError, match="cannot create"):
        AuditLog(tmp_path / "x.jsonl", container="c")


# --- proofs ---------------------------------------------------------------------------------------

def test_a_proof_verifies_alone_and_fails_when_touched(tmp_path: Path, keys: dict[str, str]) -> None:
    path = tmp_path / "p.jsonl"
    _write_log(path, keys["a"])
    proof = make_proof([str(path)], "r0013")
    entry, how = verify_proof(json.loads(json.dumps(proof)), load_public(keys["a.pub"]))
    assert entry["request_id"] == "r0013" and how.startswith("--pubkey")
    by_seq = make_proof([str(path)], str(entry["seq"]))
    assert by_seq["entry"] == proof["entry"]
    # An all-digit request id is that request, not the entry of that seq number.
    digits = verify_proof(make_proof([str(path)], "0000000000000007"), None)[0]
    assert digits["request_id"] == "0000000000000007" and digits["seq"] != 7

    def broken(**change: Any) -> dict[str, Any]:
        return {**proof, **change}
    with pytest.raises(ProofError, match="^entry: hash"):
        verify_proof(broken(entry=proof["entry"].replace('"decision":"allow"', '"decision":"deny"')), None)
    with pytest.raises(ProofError, match="^inclusion"):
        verify_proof(broken(path=list(reversed(proof["path"]))), None)
    with pytest.raises(ProofError):
        verify_proof(broken(leaf_index=proof["leaf_index"] + 1), None)
    with pytest.raises(ProofError, match="--pubkey key"):
        verify_proof(proof, load_public(keys["b.pub"]))
    seal = json.loads(proof["seal"])
    seal["sig"] = base64.b64encode(load_private(keys["b"]).sign(chain.seal_message(seal))).decode()
    with pytest.raises(ProofError, match="^signature"):
        verify_proof(broken(seal=_rewrite(seal).decode().rstrip("\n")), load_public(keys["a.pub"]))
    with pytest.raises(ProofError, match="no entry"):
        make_proof([str(path)], "nope")


# --- review findings: forgeries and malformed input -----------------------------------------------

def test_an_unsigned_forged_proof_fails_when_a_key_is_required(tmp_path: Path, keys: dict[str, str]) -> None:
    path = tmp_path / "u.jsonl"
    _write_log(path, None)
    proof = make_proof([str(path)], "r0013")
    assert "unsigned" in verify_proof(proof, None)[1]
    with pytest.raises(ProofError, match="unsigned, but --pubkey"):
        verify_proof(proof, load_public(keys["a.pub"]))


def test_a_log_without_key_or_seal_fails_when_a_key_is_required(tmp_path: Path, keys: dict[str, str]) -> None:
    log = AuditLog(tmp_path / "n.jsonl", container="c")
    log.append({"record": "decision", "decision": "allow"})
    os.close(log._fd)                  # a crash: no seal, no close
    r = verify_log([str(tmp_path / "n.jsonl")], load_public(keys["a.pub"]))
    assert not r.ok and any(p.check == "key" for p in r.problems)


def test_the_beginning_of_a_rotated_log_cannot_be_dropped(tmp_path: Path, keys: dict[str, str]) -> None:
    _write_log(tmp_path / "d.jsonl", keys["a"], n=300, batch=1000, max_segment_bytes=8192)
    files = segments(str(tmp_path / "d.jsonl"))
    os.unlink(files[0])
    os.rename(files[1], files[0])       # segment 2 passed off as the log's first file
    r = verify_log(segments(files[0]), load_public(keys["a.pub"]))
    assert not r.ok and "beginning" in r.problems[0].message
    r = verify_log(segments(files[0]), load_public(keys["a.pub"]), container="other")
    assert any("not of 'other'" in p.message for p in r.problems)


@pytest.mark.parametrize("body", ['{"prev":"x","record":"decision","seq":1,"v":1,"x":NaN}',
                                  '{"prev":"x","record":"decision","seq":1,"v":1,"x":1e400}',
                                  '{"prev":"x","record":"log","seq":0,"v":1,"pubkey":5,"key":"k"}',
                                  '{"a":' * 5000 + '1' + '}' * 5000])
def test_malformed_but_hash_consistent_lines_are_problems_not_crashes(tmp_path: Path, body: str) -> None:
    line = chain.entry_line(body)[1]
    p = tmp_path / "m.jsonl"
    p.write_bytes(line)
    r = verify_log([str(p)], use_host_pin=False)
    assert not r.ok and r.problems[0].line == 1
