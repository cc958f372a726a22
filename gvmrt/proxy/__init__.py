"""The sidecar proxy (DESIGN.md §6).

Sans-IO pieces live here (STYLE.md habit 1): `h1` turns bytes into HTTP/1.1 events and back; the
server module that owns sockets and TLS feeds it.
"""
