-- admit: one round trip decides everything about one request, atomically.
-- Checks key status, rate limits (key, org), concurrency, tokens per minute and every budget
-- that applies; only when all pass does it reserve (lease). Nothing is written on rejection
-- except housekeeping (reclaiming dead proxies' leases, dropping a removed limit's level).
-- Idempotent by request id: admitting a request that already holds a lease (a call retried
-- after a lost reply or a failover) reserves nothing more.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, rid, kid, reserve_tokens, reserve_cost_nano, lease_ms,
--          window daily, weekly, monthly,
--          role defaults rps, rpm, rph, rpd, tpm, concurrency ("" = none),
--          ttl daily, weekly, monthly (s), now_iso, prompt_tokens, model, endpoint, end user,
--          usage counters' policy (see add_usage: a reclaimed lease is charged and reported)
--
-- Returns  {"ok", req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--           tok_reset_ms, budget_remaining, budget_line, budget_unit, budget_window, budget_field}
--       or {"dup"} (already admitted)
--       or {"revoked"}
--       or {"invalid", argument}
--       or {"rate", scope, limit_name, limit, retry_after_ms, count}
--       or {"budget", field, why ("blocked"|"exceeds"), window, spend, line}

local P = KEYS[1]
local now = exact_int(ARGV[1])
local rid = ARGV[2]
local kid = ARGV[3]
local rt = exact_int(ARGV[4])
local rc = exact_int(ARGV[5])
local lease_ms = exact_int(ARGV[6])
local W = windows_from({ARGV[7], ARGV[8], ARGV[9], ARGV[16], ARGV[17], ARGV[18]}, 1)
local win = W.win
W.usage = ARGV[24]
local now_iso = ARGV[19]
local prompt_tokens = exact_int(ARGV[20])
for name, value in pairs({now_ms = now, reserve_tokens = rt, reserve_cost_nano = rc,
    lease_ms = lease_ms, prompt_tokens = prompt_tokens}) do
  if not value or value < 0 then
    return {'invalid', name}
  end
end

local function fmt_int(x)
  if x == '' then
    return ''
  end
  return I(x)
end

if redis.call('EXISTS', P .. 'lease:' .. rid) == 1 then
  return {'dup'}
end

local LIMIT_NAMES = {'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency'}
local WINDOW_MS = {1000, 60000, 3600000, 86400000, 60000}
local EPSILON = 1e-9 -- drained levels are fractions: 0.99999999999 of a request is one request

local key_hash = P .. 'key:' .. kid
local kf = redis.call('HMGET', key_hash, 'status', unpack(LIMIT_NAMES))
if kf[1] ~= 'active' then
  return {'revoked'}
end

reclaim_expired(P, now, W, now_iso, 32)

local key_limits = {}
for i = 1, 6 do
  key_limits[i] = exact_int(kf[i + 1]) or exact_int(ARGV[9 + i])
end
local of = redis.call('HMGET', P .. 'limits', unpack(LIMIT_NAMES))
local org_limits = {}
for i = 1, 6 do
  org_limits[i] = exact_int(of[i])
end
local scopes = {{'key', 'k:' .. kid, key_limits}, {'org', 'o', org_limits}}

-- Rate limits: a GCRA (leaky bucket) per limit, all of one scope in one small hash
-- ("rl:k:<kid>", "rl:o"): the level of each bucket and when the levels were last drained ('at').
-- A limit of N per window T admits N back to back, then drains at N/T: one more every T/N.
-- Tokens per minute reserve the request's worst case; settle returns the unused part.
local rate_writes = {}
local req_limit, req_remaining, req_reset = -1, -1, -1
local tok_limit, tok_remaining, tok_reset = -1, -1, -1
for _, scope in ipairs(scopes) do
  local limits = scope[3]
  if limits[1] or limits[2] or limits[3] or limits[4] or limits[5] then
    local h = P .. 'rl:' .. scope[2]
    local v = redis.call('HMGET', h, 'at', 'rps', 'rpm', 'rph', 'rpd', 'tpm')
    local at = exact_int(v[1]) or now
    local elapsed = math.max(now - at, 0)
    local write = {h, 'at', I(math.max(at, now))}
    local ttl = 0
    for i = 1, 5 do
      local limit = limits[i]
      if limit then
        local window = WINDOW_MS[i]
        local stored = tonumber(v[i + 1]) or 0
        if stored ~= stored or stored == math.huge or stored == -math.huge then
          stored = 0 -- a level no script wrote: start the bucket afresh rather than fail
        end
        local level = math.max(stored - elapsed * limit / window, 0)
        local cost = 1
        if i == 5 then
          cost = rt
        end
        local after = level + cost
        if after > limit + EPSILON then
          local retry = -1
          if cost <= limit then
            -- In milliseconds, without the rounding of the drained fraction.
            retry = math.ceil((stored + cost - limit) * window / limit - elapsed - EPSILON)
          end
          return {'rate', scope[1], LIMIT_NAMES[i], limit, retry, math.ceil(level - EPSILON)}
        end
        local remaining = math.floor(limit - after + EPSILON)
        local reset = math.ceil(after * window / limit - EPSILON)
        if i == 5 then
          if tok_limit < 0 or remaining < tok_remaining then
            tok_limit, tok_remaining, tok_reset = limit, remaining, reset
          end
        elseif req_limit < 0 or remaining < req_remaining then
          req_limit, req_remaining, req_reset = limit, remaining, reset
        end
        write[#write + 1] = LIMIT_NAMES[i]
        write[#write + 1] = string.format('%.17g', after)
        ttl = math.max(ttl, window)
      elseif v[i + 1] then
        redis.call('HDEL', h, LIMIT_NAMES[i]) -- a removed limit leaves no stale level behind
      end
    end
    write[#write + 1] = ttl
    rate_writes[#rate_writes + 1] = write
  end
end

-- Concurrency: the in-flight count of live leases.
local inflight = {}
for _, scope in ipairs(scopes) do
  inflight[scope[2]] = read_inflight(P, scope[2])
  local limit = scope[3][6]
  local n = inflight[scope[2]].n
  if limit and n >= limit then
    return {'rate', scope[1], 'concurrency', limit, -1, n}
  end
end

-- Budgets: apikey K and org O, owners cluster and org. Blocked once settled spend reaches the
-- block line; a request is refused when its worst case would carry spend past the line.
local fields = {'k:' .. kid .. ':cluster', 'k:' .. kid .. ':org', 'o:cluster', 'o:org'}
local tags = {'k:' .. kid, 'k:' .. kid, 'o', 'o'}
local rules = redis.call('HMGET', P .. 'budget_rules', unpack(fields))
local bud_remaining, bud_line, bud_unit, bud_window, bud_field = '', '', '', '', ''
local tightest = nil
for i = 1, 4 do
  local rule = rules[i]
  if rule then
    local period, unit, floor, ceil = string.match(rule, '^(%S+) (%S+) (%S+) (%S+)')
    floor, ceil = exact_int(floor), exact_int(ceil)
    local w = win[period]
    if floor and ceil and w and (unit == 'c' or unit == 't') then
      local spent = exact_int(redis.call('HGET', P .. 'spend:' .. tags[i] .. ':' .. w, unit)) or 0
      local held = inflight[tags[i]][unit]
      local r = rt
      if unit == 'c' then
        r = rc
      end
      if spent >= ceil then
        return {'budget', fields[i], 'blocked', w, spent, floor}
      end
      if spent + held + r > floor then
        return {'budget', fields[i], 'exceeds', w, spent + held, floor}
      end
      local remaining = floor - spent - held - r
      local share = remaining / math.max(floor, 1)
      if tightest == nil or share < tightest then
        tightest = share
        bud_remaining, bud_line, bud_unit = remaining, floor, unit
        bud_window, bud_field = w, fields[i]
      end
    end
  end
end

-- Everything passed: reserve.
local tpm_scopes = ''
for _, wr in ipairs(rate_writes) do
  local ttl = table.remove(wr)
  redis.call('HSET', unpack(wr))
  redis.call('PEXPIRE', wr[1], I(ttl + 1000))
end
for _, scope in ipairs(scopes) do
  if scope[3][5] then
    tpm_scopes = tpm_scopes .. scope[1]:sub(1, 1)
  end
end
local extra = ''
hold(P, lease_tags(kid, extra), rc, rt)
redis.call('HSET', P .. 'lease:' .. rid, 'k', kid, 'c', I(rc), 't', I(rt), 'r', tpm_scopes,
  'pi', I(prompt_tokens), 'm', ARGV[21] or '', 'e', ARGV[22] or '', 'u', ARGV[23] or '',
  'x', extra)
redis.call('ZADD', P .. 'leases', I(now + lease_ms), rid)

return {'ok', req_limit, req_remaining, req_reset, tok_limit, tok_remaining, tok_reset,
        fmt_int(bud_remaining), fmt_int(bud_line), bud_unit, bud_window, bud_field}
