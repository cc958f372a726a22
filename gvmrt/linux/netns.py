"""The jail's network namespace: local routes for every address, and the sidecar's listeners.

Runs in the container init, inside the new network namespace, before the rootfs is pivoted
(DESIGN.md §5). Transparent capture without netfilter: a ``local`` route for 0.0.0.0/0 and ::/0
on loopback makes every destination address local to the jail, so a listener on [::]:443 accepts
the jail's connections to any address on port 443 and ``getsockname()`` of the accepted socket
is the address the agent dialled. Ports without a listener answer "connection refused".

The routes are one rtnetlink message each, built here with `struct` on a plain netlink socket:
pyroute2 costs 110-240 ms to import on this machine, which would more than double a governed
`gvmrt create` for two 44-byte messages (see docs/architecture.md).
"""

from __future__ import annotations

import _socket
import errno
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# <linux/netlink.h>, <linux/rtnetlink.h>
NETLINK_ROUTE = 0
RTM_NEWROUTE = 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
RT_TABLE_LOCAL = 255
RTPROT_BOOT = 3
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
RTA_OIF, RTA_TABLE = 4, 15

BACKLOG = 4096
DNS_PORT = 53
IP_PKTINFO = 8          # <linux/in.h>; the socket module lacks it
IPV6_FREEBIND = 78      # <linux/in6.h>


def _route_message(family: int, ifindex: int, seq: int) -> bytes:
    rtmsg = struct.pack("=BBBBBBBBI", family, 0, 0, 0, RT_TABLE_LOCAL, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0)
    attrs = struct.pack("=HHI", 8, RTA_OIF, ifindex) + struct.pack("=HHI", 8, RTA_TABLE, RT_TABLE_LOCAL)
    body = rtmsg + attrs
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWROUTE, flags, seq, 0) + body


def add_local_routes() -> bool:
    """``ip route add local 0.0.0.0/0 dev lo table local`` and the same for ::/0.

    Returns whether the IPv6 route was added (False when IPv6 is disabled in this namespace).
    """
    lo = _socket.if_nametoindex("lo")
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        ipv6 = True
        for seq, family in ((1, _socket.AF_INET), (2, _socket.AF_INET6)):
            sock.send(_route_message(family, lo, seq))
            err = _ack(sock, seq)
            if err == 0:
                continue
            if family == _socket.AF_INET6 and err in (errno.EAFNOSUPPORT, errno.EACCES, errno.EPERM,
                                                        errno.EOPNOTSUPP):
                ipv6 = False  # IPv6 disabled (ipv6.disable=1 or disable_ipv6): IPv4 alone is captured
                continue
            raise OSError(err, f"adding the local route for {'::/0' if family == _socket.AF_INET6 else '0.0.0.0/0'} "
                               f"on lo: {os.strerror(err)}")
        return ipv6
    finally:
        sock.close()


def _ack(sock: Any, seq: int) -> int:
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, mtype, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
            if mtype == NLMSG_ERROR and mseq == seq:
                return -struct.unpack_from("=i", data, off + 16)[0]
            off += (length + 3) & ~3
            if length < 16:
                break


def listeners(capture: list[int], proxy_port: int, ipv6: bool) -> list[tuple[str, int, Any]]:
    """The sidecar's listening sockets in this namespace: [(kind, port, socket)].

    kind "capture": every address on `port` ([::] dual-stack, or 0.0.0.0 without IPv6);
    kind "proxy": the explicit proxy on 127.0.0.1:`proxy_port`;
    kinds "dns-udp" (one per family) and "dns-tcp": the DNS stub's, on every address, port 53.
    The caller passes them on and closes its copies: the jail must hold none (a listener left in
    the jail would let the agent accept its own connections, or keep a dead sidecar's port open).
    """
    out: list[tuple[str, int, Any]] = []
    try:
        for port in capture:
            if ipv6:
                s = _socket.socket(_socket.AF_INET6, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
                s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
                out.append(("capture", port, s))
                s.bind(("::", port))
            else:
                s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
                out.append(("capture", port, s))
                s.bind(("0.0.0.0", port))
            s.listen(BACKLOG)
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        out.append(("proxy", proxy_port, s))
        s.bind(("127.0.0.1", proxy_port))
        s.listen(BACKLOG)
        # DNS, on every address like the rest: UDP per family, since a reply must come from the
        # address the query went to (IP_PKTINFO / IPV6_PKTINFO; IPV6_FREEBIND lets the sidecar send
        # from an IPv6 address that is local by route but on no interface), and TCP.
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        out.append(("dns-udp", DNS_PORT, s))
        s.setsockopt(_socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", DNS_PORT))
        if ipv6:
            s = _socket.socket(_socket.AF_INET6, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            out.append(("dns-udp", DNS_PORT, s))
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_RECVPKTINFO, 1)
            s.setsockopt(_socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            s.bind(("::", DNS_PORT))
        if DNS_PORT not in capture:
            s = _socket.socket(_socket.AF_INET6 if ipv6 else _socket.AF_INET, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
            out.append(("dns-tcp", DNS_PORT, s))
            if ipv6:
                s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
            s.bind(("::" if ipv6 else "0.0.0.0", DNS_PORT))
            s.listen(BACKLOG)
    except OSError:
        for _, _, s in out:
            s.close()
        raise
    return out
