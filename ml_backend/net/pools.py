"""The outbound gate's connection pools, each pinned to one checked address.

A pool connects to the IP address the gate checked (:meth:`ml_backend.net.gate.OutboundGate.check`), never to a
name resolved again, so a host name cannot be rebound to another address between the check and the connection;
over https it verifies the certificate against the original host name (certifi's CA bundle). Its connections
are the deadline-guarded ones of ``ml_backend.net.deadline``. Only the gate creates and uses these pools.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import certifi
import urllib3

from ml_backend.net.deadline import GuardedHTTPConnection, GuardedHTTPSConnection
from ml_backend.net.urls import Origin

__all__ = ["PinnedPools"]


class PinnedPools:
    """Connection pools kept per (checked address, host, port, scheme), least recently used ones closed; thread-safe.

    Args:
        max_pools: connection pools kept.
    """

    def __init__(self, max_pools: int = 32) -> None:
        self._pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
        self._max_pools = max_pools
        self._lock = threading.Lock()

    def get(self, origin: Origin, ip: str) -> urllib3.HTTPConnectionPool:
        """The pool of ``origin`` pinned to the checked address ``ip`` (created on first use)."""
        key = (ip, origin.host, origin.port, origin.scheme)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            if origin.scheme == "https":
                pool = urllib3.HTTPSConnectionPool(ip, origin.port, maxsize=8, server_hostname=origin.host,
                                                   assert_hostname=origin.host, cert_reqs="CERT_REQUIRED",
                                                   ca_certs=certifi.where())
                pool.ConnectionCls = GuardedHTTPSConnection
            else:
                pool = urllib3.HTTPConnectionPool(ip, origin.port, maxsize=8)
                pool.ConnectionCls = GuardedHTTPConnection
            self._pools[key] = pool
            while len(self._pools) > self._max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
