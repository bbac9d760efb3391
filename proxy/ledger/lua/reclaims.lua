-- Reclaims: the leases of proxies that stopped renewing them.

local MARKER_TTL = 8 * 86400 -- a reclaimed request may still settle late (spool replay)

-- A lease whose proxy died: released, and its whole reservation charged — it is the most the
-- request could have spent, and the part of it that was used is unknown. A marker keeps what
-- was charged where, so the proxy's own settle, if it comes after all, corrects it to the
-- actual usage exactly once.
local function reclaim_lease(P, l, W, now, now_iso)
  release_lease(P, l)
  local tags = lease_tags(l.k, l.x)
  add_spend(P, tags, l.t, l.c, W, false)
  local events = check_budgets(P, tags, W, now, now_iso, l.rid)
  local labels = add_usage(P, now, now, W.usage, l.k, l.m, l.e, l.u,
    {1, l.pi, 0, l.t - l.pi, l.c})
  append_usage(P, {'rid', l.rid, 'kid', l.k, 'user', l.u, 'model', l.m, 'endpoint', l.e,
    'in', I(l.pi), 'out', I(l.t - l.pi), 'cached', '0', 'reasoning', '0', 'cost_nano', I(l.c),
    'reported', '0', 'status', '0', 'client_gone', '0', 'reclaimed', '1'})
  local marker = P .. K.reclaimed .. l.rid
  redis.call('HSET', marker, 'k', l.k, 'x', l.x, 'c', I(l.c), 't', I(l.t),
    'daily', W.win.daily, 'weekly', W.win.weekly, 'monthly', W.win.monthly)
  -- Where the usage counters got the charge, for the late settle's correction.
  redis.call('HSET', marker, 'ua', I(now), 'pi', I(l.pi), 'm', l.m, 'e', l.e,
    'u1', labels[1], 'u2', labels[2], 'u3', labels[3])
  redis.call('EXPIRE', marker, MARKER_TTL)
  return events
end

-- Expired leases of the org, oldest first, at most `limit` per call (bounded work).
local function reclaim_expired(P, now, W, now_iso, limit)
  local expired = redis.call('ZRANGEBYSCORE', P .. K.leases, '-inf', I(now), 'LIMIT', 0, limit)
  local reclaimed, set_aside_n = 0, 0
  for _, rid in ipairs(expired) do
    local l, why = read_lease(P, rid)
    if l then
      reclaim_lease(P, l, W, now, now_iso)
      reclaimed = reclaimed + 1
    elseif why == 'missing' then
      redis.call('ZREM', P .. K.leases, rid)
    else
      set_aside(P, rid, now, why)
      set_aside_n = set_aside_n + 1
    end
  end
  return reclaimed, set_aside_n
end
