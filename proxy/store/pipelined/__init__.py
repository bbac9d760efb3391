"""Pipelining Redis connections for the hot path: the admit and settle script calls.

Every request makes two script calls. Through a pooled client each costs a connection
checkout, Python-level command packing and a socket round trip of its own; here all calls of a
process to one server share one connection (a ``Link``), are packed by hiredis and written as
they come, and replies are matched to callers in order. At most one batch is on the wire at a
time: calls made while Redis is answering wait for that answer and then leave together, so
under load the calls of many requests share one write and one read on each side (the "settles
pipelined across requests" the machine's measurements asked for), while a call made on an idle
connection leaves at once. Everything else (admin API, scripts loading) uses redis-py.

``PipelinedConnection`` is what admission calls. A router gives it the link of the master that
holds a call's slot — the one server of a ``redis://`` URL, the master the sentinels name, or
the master of the call's shard on a cluster (``proxy.store.cluster``, ``proxy.store.sentinel``)
— and it survives what a restart or a failover throws at a call:

* **A connection found dead before the reply** (Redis restarted, a master failed over): the
  router is asked again and the call is sent once more on a fresh connection. A call that had
  not left yet is always safe to resend; one that had is resent once, because both scripts are
  idempotent by request id (settle releases a lease at most once; a second admit with the same
  id gets the existing reservation, never a second lease).
* **MOVED** (the slot has another owner): the call follows it and the router reads the slot
  map again. **ASK** (the slot is being migrated) is followed for plain commands (``ASKING``
  first, on the same connection) but not for script calls: a script declares only the org
  prefix, a key that never exists, so Redis would send every call to the importing node,
  which holds only the keys moved so far — a budget checked against part of its spend.
  Such a call is treated like the next errors.
* **READONLY** (the old master came back as a replica), **TRYAGAIN**, **CLUSTERDOWN**,
  **LOADING**, an ASK for a script, a master that does not accept connections: Redis did not
  run the call; the router refreshes its map, and if that names another node the call goes
  there (a bounded number of times). Otherwise — a failover still under way — it fails at once
  as a store error (503 for an admit, a deferred retry for a settle), not after a wait.
* **NOSCRIPT** (a promoted replica never loaded the scripts): the script is loaded on that very
  node and the call sent again.

With ``durability = "replicated"`` each batch ends with ``WAIT <replicas> <timeout>``, and its
replies are handed out only once that many replicas hold the batch; otherwise every call of the
batch fails with ``ReplicaTimeout``. One ``WAIT`` per batch, not per call: Redis blocks a client
while it waits, so a ``WAIT`` behind every call would queue the batch behind as many replica
round trips.

Modules: ``errors`` (reply errors as redis-py's exceptions), ``protocol`` (hiredis reader,
replies matched to calls), ``link`` (one pipelined connection, batching, WAIT, watchdog),
``router`` (which link a call goes to), ``retry`` (``PipelinedConnection``: redirects and
retries), ``noscript`` (loading a script a node lacks).
"""

from proxy.store.pipelined.errors import ConnectionLost, ReplicaTimeout, reply_error
from proxy.store.pipelined.link import Link, ask_once
from proxy.store.pipelined.retry import PipelinedConnection
from proxy.store.pipelined.router import Router, SingleNode

__all__ = [
    "ConnectionLost",
    "Link",
    "PipelinedConnection",
    "ReplicaTimeout",
    "Router",
    "SingleNode",
    "ask_once",
    "reply_error",
]
