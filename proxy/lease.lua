-- Shared by admit.lua and settle.lua (prepended to both at load time).
-- A lease is one admitted request's reservation: in-flight cost, tokens and a concurrency slot
-- on the key and on the org. Releasing it is the single way reservations leave the books.
--
-- The lease is one member of the org's `leases` sorted set (score: expiry, ms), and the member
-- carries everything a release needs: "rid|admitted_ms|cost|tokens|tpm_scopes|kid", where
-- tpm_scopes says which scopes' tokens-per-minute logs hold the reservation ("k", "o", "ko" or
-- ""). No per-request hash: admit writes one member and settle removes it.

local function parse_lease(member)
  local rid, t0, c, t, tpm, kid = string.match(member, '^([^|]+)|(%d+)|(%d+)|(%d+)|(%a*)|(.+)$')
  return rid, tonumber(t0), tonumber(c), tonumber(t), tpm, kid
end

-- In-flight totals live in one hash per org: fields "k:<kid>:n|c|t" and "o:n|c|t".
local function infl_fields(kid)
  local k = 'k:' .. kid .. ':'
  return {k .. 'n', k .. 'c', k .. 't', 'o:n', 'o:c', 'o:t'}
end

-- Integers as Redis arguments: Lua would write large ones in exponent notation.
local function int_arg(x)
  return string.format('%.0f', x)
end

-- Adds sign * (1 slot, c, t) to the key's and the org's in-flight totals. `v`: their current
-- values when the caller has read them already (HMGET of infl_fields).
local function move_inflight(P, kid, sign, c, t, v)
  local f = infl_fields(kid)
  v = v or redis.call('HMGET', P .. 'infl', unpack(f))
  local d = {sign, sign * c, sign * t, sign, sign * c, sign * t}
  local args = {}
  for i = 1, 6 do
    args[2 * i - 1] = f[i]
    args[2 * i] = int_arg((tonumber(v[i]) or 0) + d[i])
  end
  redis.call('HSET', P .. 'infl', unpack(args))
end

-- Removes the lease and its in-flight share; false when it was no longer there.
local function release_lease(P, member)
  if redis.call('ZREM', P .. 'leases', member) == 0 then
    return false
  end
  local _, _, c, t, _, kid = parse_lease(member)
  move_inflight(P, kid, -1, c, t)
  return true
end

-- A proxy that died mid-request never settles: its lease expires and is reclaimed here, by the
-- next admission in the same org (bounded work per call).
local function reclaim_expired(P, now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 32)
  for _, member in ipairs(expired) do
    if release_lease(P, member) then
      -- Its proxy may yet settle (it was only cut off from Redis): let that settle count once.
      local rid = parse_lease(member)
      redis.call('SET', P .. 'reclaimed:' .. rid, '1', 'EX', 86400)
    end
  end
  return #expired
end
