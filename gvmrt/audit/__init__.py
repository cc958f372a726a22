"""The audit log (issue 5; DESIGN.md §7): hash-chained, Merkle-sealed, Ed25519-signed JSON lines.

- `chain`: the format, sans-IO: canonical entries, their hashes, Merkle batches and seals.
- `keys`: Ed25519 signing keys (`gvmrt audit keygen`) and where the host keeps them.
- `writer`: the monitor's appender: group commit, durable appends, rotation, fail closed.
- `verify`: offline checks of a log or of one entry's inclusion proof.
- `read`: finding a log's segment files and reading its records (tolerant of a torn tail).

spec/audit.md is the format's specification.
"""
