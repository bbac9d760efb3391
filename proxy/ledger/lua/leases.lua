-- Leases: one admitted request's reservation — in-flight cost, tokens and a concurrency slot
-- on every scope it counts against (the key, the org, any extra tags). Releasing it (and
-- giving back its unused tokens-per-minute) is the single way reservations leave the books
-- (reclaims.lua charges a dead proxy's).

local LEASE_FIELDS = {'k', 'c', 't', 'r', 'pi', 'm', 'e', 'u', 'x'}

-- The lease of rid, or nil and why: 'missing' (settled or never written) or 'malformed'.
local function read_lease(P, rid)
  local v = redis.call('HMGET', P .. K.lease .. rid, unpack(LEASE_FIELDS))
  if not v[1] then
    if redis.call('EXISTS', P .. K.lease .. rid) == 1 then
      return nil, 'malformed'
    end
    return nil, 'missing'
  end
  local l = {
    rid = rid, k = v[1], c = exact_int(v[2]), t = exact_int(v[3]), r = v[4] or '',
    pi = exact_int(v[5] or 0), m = v[6] or '', e = v[7] or '', u = v[8] or '', x = v[9] or '',
  }
  if not l.c or not l.t or not l.pi or l.c < 0 or l.t < 0 then
    return nil, 'malformed'
  end
  return l
end

-- Scopes a lease counts against: the key's, the org's, then its extra tags (space-separated).
local function lease_tags(kid, extra)
  local tags = {TAG.key .. kid, TAG.org}
  for tag in string.gmatch(extra or '', '%S+') do
    tags[#tags + 1] = tag
  end
  return tags
end

-- An in-flight hash rebuilt from the org's live leases: for a counter that holds something no
-- script wrote (it would otherwise fail every admission of the org).
local function heal_inflight(P, tag)
  local n, c, t = 0, 0, 0
  for _, rid in ipairs(redis.call('ZRANGE', P .. K.leases, 0, -1)) do
    local l = read_lease(P, rid)
    if l then
      for _, other in ipairs(lease_tags(l.k, l.x)) do
        if other == tag then
          n, c, t = n + 1, c + l.c, t + l.t
        end
      end
    end
  end
  local h = P .. K.infl .. tag
  redis.call('DEL', h)
  if n > 0 then
    redis.call('HSET', h, 'n', I(n), 'c', I(c), 't', I(t))
  end
  redis.log(redis.LOG_WARNING, 'llm-proxy: rebuilt corrupt in-flight counters ' .. h)
end

-- In-flight {n, c, t} of a scope, healed first if a field is not an exact integer or the
-- count exceeds the org's live leases (a counter left behind: it would refuse forever).
local function read_inflight(P, tag)
  local v = redis.call('HMGET', P .. K.infl .. tag, 'n', 'c', 't')
  local n, c, t = exact_int(v[1] or 0), exact_int(v[2] or 0), exact_int(v[3] or 0)
  if not (n and c and t) or n < 0 or (n > 0 and n > redis.call('ZCARD', P .. K.leases))
      or (n == 0 and (c ~= 0 or t ~= 0)) then
    heal_inflight(P, tag)
    v = redis.call('HMGET', P .. K.infl .. tag, 'n', 'c', 't')
    n, c, t = exact_int(v[1] or 0), exact_int(v[2] or 0), exact_int(v[3] or 0)
  end
  return {n = n, c = c, t = t}
end

-- known: the in-flight counters this script read (read_inflight) and has not changed since,
-- by tag: then one HSET per scope rather than three HINCRBYs, unless a sum would pass what a
-- double holds exactly.
local function hold(P, tags, cost, tokens, known)
  for _, tag in ipairs(tags) do
    local h = P .. K.infl .. tag
    local was = known and known[tag]
    if was and was.c + cost <= MAX_EXACT and was.t + tokens <= MAX_EXACT then
      redis.call('HSET', h, 'n', I(was.n + 1), 'c', I(was.c + cost), 't', I(was.t + tokens))
    else
      redis.call('HINCRBY', h, 'c', I(cost))
      redis.call('HINCRBY', h, 't', I(tokens))
      redis.call('HINCRBY', h, 'n', 1)
    end
  end
end

local function release_lease(P, l)
  local c_arg, t_arg = I(-l.c), I(-l.t)
  for _, tag in ipairs(lease_tags(l.k, l.x)) do
    local h = P .. K.infl .. tag
    local left = redis.pcall('HINCRBY', h, 'n', -1)
    if type(left) ~= 'number' or left <= 0 then
      redis.call('DEL', h) -- nothing in flight (or a corrupt counter): no hash kept per idle scope
    else
      redis.pcall('HINCRBY', h, 'c', c_arg)
      redis.pcall('HINCRBY', h, 't', t_arg)
    end
  end
  redis.call('DEL', P .. K.lease .. l.rid)
  redis.call('ZREM', P .. K.leases, l.rid)
end

-- A record that cannot be processed is set aside, never in the way of the next admission:
-- out of the expiry index, kept (with the reason) for an operator; the sweeper reports it.
-- Whatever it held in flight is unknown, so the counters it may be part of are rebuilt.
local function set_aside(P, rid, now, why)
  redis.call('ZREM', P .. K.leases, rid)
  redis.call('ZADD', P .. K.stuck, I(now), rid)
  redis.call('HSET', P .. K.stuck_why, rid, why)
  local kx = redis.call('HMGET', P .. K.lease .. rid, 'k', 'x')
  heal_inflight(P, TAG.org)
  if kx[1] then
    heal_inflight(P, TAG.key .. kx[1])
  end
  for tag in string.gmatch(kx[2] or '', '%S+') do
    heal_inflight(P, tag)
  end
end

-- The end user's tag among a lease's extra tags (budget_fields.lua), if any.
local function end_user_tag_in(extra)
  return string.match(extra or '', '(' .. TAG.user .. '%x+)')
end

-- Tokens per minute: give back what the reservation took beyond actual use (or take the excess).
local function refund_tpm(P, l, tokens)
  local refund = l.t - tokens
  if refund == 0 or l.r == '' then
    return
  end
  for scope in string.gmatch(l.r, '.') do
    local h = P .. K.rl .. TAG.org
    if scope == 'k' then
      h = P .. K.rl .. TAG.key .. l.k
    elseif scope == 'u' then
      h = P .. K.rl .. (end_user_tag_in(l.x) or TAG.user)
    end
    if redis.call('HEXISTS', h, 'tpm') == 1 then
      redis.pcall('HINCRBYFLOAT', h, 'tpm', string.format('%.17g', -refund))
    end
  end
end
