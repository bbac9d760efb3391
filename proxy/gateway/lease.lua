-- Shared by admit.lua and settle.lua (prepended to both at load time).
-- A lease is one admitted request's reservation: in-flight cost, tokens and a concurrency slot
-- on the key and on the org. Releasing it is the single way reservations leave the books.

local function release_lease(P, rid)
  local lease_key = P .. 'lease:' .. rid
  local l = redis.call('HMGET', lease_key, 'k', 'c', 't', 'r')
  if not l[1] then
    return false
  end
  local c = tonumber(l[2]) or 0
  local t = tonumber(l[3]) or 0
  for _, h in ipairs({P .. 'infl:k:' .. l[1], P .. 'infl:o'}) do
    -- 0 - x, not -x: a Lua -0 reaches Redis as "-0", which HINCRBY rejects (a lease that
    -- reserved nothing, e.g. count_tokens, must still be released).
    redis.call('HINCRBY', h, 'c', 0 - c)
    redis.call('HINCRBY', h, 't', 0 - t)
    redis.call('HINCRBY', h, 'n', -1)
  end
  redis.call('DEL', lease_key)
  redis.call('ZREM', P .. 'leases', rid)
  return l
end

-- A proxy that died mid-request never settles: its lease expires and is reclaimed here, by the
-- next admission in the same org (bounded work per call).
local function reclaim_expired(P, now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 32)
  for _, rid in ipairs(expired) do
    if release_lease(P, rid) then
      -- Its proxy may yet settle (it was only cut off from Redis): let that settle count once.
      redis.call('SET', P .. 'reclaimed:' .. rid, '1', 'EX', 86400)
    else
      redis.call('ZREM', P .. 'leases', rid)
    end
  end
  return #expired
end
