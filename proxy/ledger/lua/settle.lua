-- settle: one request's settle in one call (settle_one.lua). settle_batch.lua settles many.
--
-- KEYS, ARGV  see SettleArgs in proxy/ledger/args.py (the only place that builds them)
-- Returns  number of budget events recorded, or -1 when this request was already settled

return settle_one(KEYS[1], ARGV)
