"""The ledger: every Lua script, every Redis key name and budget field, and the stores that
read and write them. Key names and budget fields are built in ``keys`` only; scripts are
composed in ``scripts``; typed arguments become the scripts' KEYS/ARGV in ``args``."""
