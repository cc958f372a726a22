"""gvmrt.capool: ready CAs for governed creates, claimed once each, never stale or loose."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gvmrt import capool
from gvmrt.proxy.certs import CertificateAuthority


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "ca-pool"
    monkeypatch.setattr(capool, "pool_dir", lambda: str(p))
    return p


def test_no_pool_no_ca(pool: Path, tmp_path: Path) -> None:
    assert capool.claim(str(tmp_path / "ca")) is None


def test_refill_then_claim_each_once(pool: Path, tmp_path: Path) -> None:
    capool.refill(2)
    entries = sorted(os.listdir(pool))
    assert len(entries) == 2 and pool.stat().st_mode & 0o777 == 0o700
    for e in entries:
        assert (pool / e / "ca.key").stat().st_mode & 0o777 == 0o600
    got = [capool.claim(str(tmp_path / f"ca{i}")) for i in range(3)]
    assert got[0] and got[1] and got[0] != got[1] and got[2] is None
    # What was claimed is a whole, loadable CA, now the container's own.
    ca = CertificateAuthority.load(tmp_path / "ca0")
    assert ca.cert_pem.decode() == got[0]
    assert os.listdir(pool) == []
    capool.refill(2)
    assert len(os.listdir(pool)) == 2, "refill tops up"


def test_stale_and_half_written_entries_are_thrown_away(pool: Path, tmp_path: Path) -> None:
    capool.refill(1)
    [entry] = os.listdir(pool)
    old = time.time() - capool.MAX_AGE - 10
    os.utime(pool / entry, (old, old))
    (pool / ".new-1-abcd").mkdir(mode=0o700)
    os.utime(pool / ".new-1-abcd", (old, old))
    assert capool.claim(str(tmp_path / "ca")) is None
    assert os.listdir(pool) == []


def test_a_pool_others_can_reach_is_not_used(pool: Path, tmp_path: Path) -> None:
    capool.refill(1)
    pool.chmod(0o755)
    assert capool.claim(str(tmp_path / "ca")) is None
