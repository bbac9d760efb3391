-- admit: one round trip decides everything about one request, atomically.
-- Checks key status, rate limits (key, org), concurrency, tokens per minute and every budget
-- that applies; only when all pass does it reserve (lease). Nothing is written on rejection
-- except the pruning of expired entries.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, rid, kid, reserve_tokens, reserve_cost_nano, lease_ms,
--          window daily, weekly, monthly,
--          role defaults rps, rpm, rph, rpd, tpm, concurrency ("" = none)
--
-- Returns  {"ok", req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--           tok_reset_ms, budget_remaining, budget_line, budget_unit, budget_window, budget_field}
--       or {"revoked"}
--       or {"rate", scope, limit_name, limit, retry_after_ms, count}
--       or {"budget", field, why ("blocked"|"exceeds"), window, spend, line}

local P = KEYS[1]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local kid = ARGV[3]
local rt = tonumber(ARGV[4])
local rc = tonumber(ARGV[5])
local lease_ms = tonumber(ARGV[6])
local win = {daily = ARGV[7], weekly = ARGV[8], monthly = ARGV[9]}

local function fmt_int(x)
  if x == '' then
    return ''
  end
  return string.format('%.0f', x)
end

local LIMIT_NAMES = {'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency'}
local REQUEST_WINDOWS = {{1, 1000, 's'}, {2, 60000, 'm'}, {3, 3600000, 'h'}, {4, 86400000, 'd'}}
local TPM_MS = 60000

local key_hash = P .. 'key:' .. kid
local kf = redis.call('HMGET', key_hash, 'status', unpack(LIMIT_NAMES))
if kf[1] ~= 'active' then
  return {'revoked'}
end

reclaim_expired(P, now)

local key_limits = {}
for i = 1, 6 do
  key_limits[i] = tonumber(kf[i + 1]) or tonumber(ARGV[9 + i])
end
local of = redis.call('HMGET', P .. 'limits', unpack(LIMIT_NAMES))
local org_limits = {}
for i = 1, 6 do
  org_limits[i] = tonumber(of[i])
end
local scopes = {{'key', 'k:' .. kid, key_limits}, {'org', 'o', org_limits}}

-- Request windows: a sliding log per (scope, window); exact under any concurrency because this
-- script is the only writer and runs atomically.
local req_writes = {}
local req_limit, req_remaining, req_reset = -1, -1, -1
for _, scope in ipairs(scopes) do
  local limits = scope[3]
  for _, w in ipairs(REQUEST_WINDOWS) do
    local limit = limits[w[1]]
    if limit then
      local z = P .. 'rl:' .. scope[2] .. ':' .. w[3]
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now - w[2])
      local count = redis.call('ZCARD', z)
      if count >= limit then
        local nth = redis.call('ZRANGE', z, count - limit, count - limit, 'WITHSCORES')
        local retry = tonumber(nth[2]) + w[2] - now
        return {'rate', scope[1], LIMIT_NAMES[w[1]], limit, retry, count}
      end
      local remaining = limit - count - 1
      if req_limit < 0 or remaining < req_remaining then
        local oldest = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
        req_limit, req_remaining = limit, remaining
        req_reset = oldest[2] and (tonumber(oldest[2]) + w[2] - now) or w[2]
      end
      req_writes[#req_writes + 1] = {z, w[2]}
    end
  end
end

-- Tokens per minute: a sliding log of reservations, refunded to actual usage at settle.
local tpm_writes = {}
local tok_limit, tok_remaining, tok_reset = -1, -1, -1
for _, scope in ipairs(scopes) do
  local limit = scope[3][5]
  if limit then
    local z = P .. 'tpm:' .. scope[2]
    local h = P .. 'tpmv:' .. scope[2]
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - TPM_MS)
    if #old > 0 then
      local freed = 0
      for _, r in ipairs(old) do
        freed = freed + (tonumber(redis.call('HGET', h, r)) or 0)
        redis.call('HDEL', h, r)
      end
      redis.call('HINCRBY', h, '_total', -freed)
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now - TPM_MS)
    end
    local total = tonumber(redis.call('HGET', h, '_total')) or 0
    if total + rt > limit then
      local retry = -1
      if rt <= limit then
        local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
        local freed = 0
        for i = 1, #entries, 2 do
          freed = freed + (tonumber(redis.call('HGET', h, entries[i])) or 0)
          if total - freed + rt <= limit then
            retry = tonumber(entries[i + 1]) + TPM_MS - now
            break
          end
        end
      end
      return {'rate', scope[1], 'tpm', limit, retry, total}
    end
    local remaining = limit - total - rt
    if tok_limit < 0 or remaining < tok_remaining then
      local oldest = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
      tok_limit, tok_remaining = limit, remaining
      tok_reset = oldest[2] and (tonumber(oldest[2]) + TPM_MS - now) or TPM_MS
    end
    tpm_writes[#tpm_writes + 1] = {z, h}
  end
end

-- Concurrency: the in-flight count of live leases.
for _, scope in ipairs(scopes) do
  local limit = scope[3][6]
  if limit then
    local n = tonumber(redis.call('HGET', P .. 'infl:' .. scope[2], 'n')) or 0
    if n >= limit then
      return {'rate', scope[1], 'concurrency', limit, -1, n}
    end
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
    floor, ceil = tonumber(floor), tonumber(ceil)
    if floor then
      local w = win[period]
      local spent = tonumber(redis.call('HGET', P .. 'spend:' .. tags[i] .. ':' .. w, unit)) or 0
      local held = tonumber(redis.call('HGET', P .. 'infl:' .. tags[i], unit)) or 0
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
for _, wr in ipairs(req_writes) do
  redis.call('ZADD', wr[1], now, rid)
  redis.call('PEXPIRE', wr[1], wr[2] + 1000)
end
for _, wr in ipairs(tpm_writes) do
  redis.call('ZADD', wr[1], now, rid)
  redis.call('HSET', wr[2], rid, rt)
  redis.call('HINCRBY', wr[2], '_total', rt)
  redis.call('PEXPIRE', wr[1], TPM_MS + 1000)
  redis.call('PEXPIRE', wr[2], TPM_MS + 1000)
end
for _, h in ipairs({P .. 'infl:k:' .. kid, P .. 'infl:o'}) do
  redis.call('HINCRBY', h, 'c', rc)
  redis.call('HINCRBY', h, 't', rt)
  redis.call('HINCRBY', h, 'n', 1)
end
redis.call('HSET', P .. 'lease:' .. rid, 'k', kid, 'c', rc, 't', rt)
redis.call('ZADD', P .. 'leases', now + lease_ms, rid)

return {'ok', req_limit, req_remaining, req_reset, tok_limit, tok_remaining, tok_reset,
        fmt_int(bud_remaining), fmt_int(bud_line), bud_unit, bud_window, bud_field}
