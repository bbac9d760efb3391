-- reclaim: the sweeper's pass over one org. Leases whose proxy stopped renewing them are
-- released and charged (see reclaim_lease in lease.lua), so an org with no further traffic
-- does not keep a dead proxy's reservations and concurrency slots held.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, window daily, weekly, monthly, ttl daily, weekly, monthly (s), now_iso, limit,
--          usage counters' policy (see add_usage)
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
return {reclaimed, aside, redis.call('ZCARD', P .. 'leases:stuck')}
