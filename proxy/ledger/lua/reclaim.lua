-- reclaim: the sweeper's pass over one org. Leases whose proxy stopped renewing them are
-- released and charged (see reclaim_lease in reclaims.lua), so an org with no further traffic
-- does not keep a dead proxy's reservations and concurrency slots held.
--
-- KEYS, ARGV  see ReclaimArgs in proxy/ledger/args.py (the only place that builds them)
-- Returns  {reclaimed, set aside now, set aside in all (kept for an operator)}

local P = KEYS[1]
local now = exact_int(ARGV[1])
local W = windows_from(ARGV, 2)
W.usage = ARGV[10]
local limit = exact_int(ARGV[9]) or 100
if not now then
  return redis.error_reply('reclaim: now_ms must be an exact integer')
end
local reclaimed, aside = reclaim_expired(P, now, W, ARGV[8], limit)
return {reclaimed, aside, redis.call('ZCARD', P .. K.stuck)}
