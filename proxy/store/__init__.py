"""Redis: the connection, the scripts, and the records the request path reads (keys,
budgets, spend windows). Every key of one org carries the org's hash tag."""
