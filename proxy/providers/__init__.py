"""Upstreams: one module per upstream kind, and the HTTP client they share.

Providers know wire formats and credentials, nothing about budgets or keys.
"""
