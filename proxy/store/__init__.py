"""Redis connections and topologies (single, Sentinel, Cluster), the pipelined hot path, the
embedded Redis, the typed client interface (``client``) and the script runner (``scripts``).
What is stored, and under which names, is ``proxy.ledger``'s."""
