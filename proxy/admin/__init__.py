"""The operators' side: HTTP APIs over keys, budgets and usage, webhooks, health."""
