"""The request path: auth → parse & price → admit → forward → settle.

Everything an LLM request touches between the client's socket and the upstream lives here;
it reads records from ``proxy.store`` and speaks to upstreams through ``proxy.providers``.
"""
