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
--          end-user tag ("u:<hex>", "" = none), dry run ("1": decide, write nothing),
--          clamp asked ("1": the request accepts a lower output cap on any budget),
--          clamp terms: choices (0 = the output cap cannot be lowered), cap per choice,
--          lowest cap per choice, and the cost function's parts A div 1e6, A mod 1e6,
--          R div 1e6, R mod 1e6, where cost(output) = ceil((A + output * R) / 1e6)
--
-- Returns  {"ok", req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--           tok_reset_ms, budget_remaining, budget_line, budget_unit, budget_window, budget_field,
--           clamped cap per choice ("" = not clamped), reserved tokens, reserved cost}
--       or {"dup"} (already admitted)
--       or {"revoked"}
--       or {"need_user"} (the org requires X-On-Behalf-Of)
--       or {"invalid", argument}
--       or {"rate", scope, limit_name, limit, retry_after_ms, count}
--       or {"budget", field, why ("blocked"|"exceeds"), window, spend, line, reserved, unit}

local P = KEYS[1]
local now = exact_int(ARGV[1])
local rid = ARGV[2]
local kid = ARGV[3]
local rt = exact_int(ARGV[4])
local rc = exact_int(ARGV[5])
local lease_ms = exact_int(ARGV[6])
local W = windows_from({ARGV[7], ARGV[8], ARGV[9], ARGV[16], ARGV[17], ARGV[18]}, 1)
local win = W.win
local now_iso = ARGV[19]
local prompt_tokens = exact_int(ARGV[20])
local user = ARGV[24] or ''
local dry = ARGV[25] == '1'
local clamp_asked = ARGV[26] == '1'
local choices = exact_int(ARGV[27] or 0)
local cap_max, cap_min = exact_int(ARGV[28] or 0), exact_int(ARGV[29] or 0)
local a_q, a_r = exact_int(ARGV[30] or 0), exact_int(ARGV[31] or 0)
local r_q, r_r = exact_int(ARGV[32] or 0), exact_int(ARGV[33] or 0)
for name, value in pairs({now_ms = now, reserve_tokens = rt, reserve_cost_nano = rc,
    lease_ms = lease_ms, prompt_tokens = prompt_tokens, choices = choices, cap_max = cap_max,
    cap_min = cap_min, a_q = a_q, a_r = a_r, r_q = r_q, r_r = r_r}) do
  if not value or value < 0 then
    return {'invalid', name}
  end
end
if user ~= '' and not string.match(user, '^u:%x+$') then
  return {'invalid', 'end_user'}
end
-- Clamping lowers the cap per choice within [cap_min, cap_max); the caller guarantees that
-- the reservation is prompt + cap_max * choices tokens costing cost(cap_max * choices).
local clampable = choices > 0 and cap_min >= 1 and cap_min < cap_max

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
-- The org's policy hash: its own limits, then its end-user settings (see proxy/store/keys.py).
local of = redis.call('HMGET', P .. 'limits', 'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency',
  'u_required', 'u_track', 'u_rps', 'u_rpm', 'u_rph', 'u_rpd', 'u_tpm', 'u_concurrency')
if user == '' and of[7] == '1' then
  return {'need_user'}
end
local org_limits, user_limits = {}, {}
local user_limited = false
for i = 1, 6 do
  org_limits[i] = exact_int(of[i])
  user_limits[i] = exact_int(of[8 + i])
  user_limited = user_limited or user_limits[i] ~= nil
end

-- Budgets that may apply: the key's, the org's and, for a named end user, theirs and the
-- org's default for each end user (see budget_fields in lease.lua).
local bud_tags = {'k:' .. kid, 'o'}
if user ~= '' then
  bud_tags[3] = user
end
local fields, tags = budget_fields(bud_tags)
local rules = redis.call('HMGET', P .. 'budget_rules', unpack(fields))

-- An end user counts as a scope of its own (in-flight, spend windows, rate limits) only where
-- the org asks for it: a budget or limit that applies to them, or u_track. Everyone else's
-- requests cost nothing more than without the header.
local tracked = false
if user ~= '' then
  tracked = of[8] == '1' or user_limited
  for i = 5, #fields do
    tracked = tracked or rules[i] ~= false
  end
end
local scopes = {{'key', 'k:' .. kid, key_limits, 'k'}, {'org', 'o', org_limits, 'o'}}
if tracked then
  scopes[3] = {'end_user', user, user_limits, 'u'}
end

-- Rate limits: a GCRA (leaky bucket) per limit, all of one scope in one small hash
-- ("rl:k:<kid>", "rl:o"): the level of each bucket and when the levels were last drained ('at').
-- A limit of N per window T admits N back to back, then drains at N/T: one more every T/N.
-- Tokens per minute reserve the request's worst case; settle returns the unused part.
local rate_writes = {}
local tpm_slots = {} -- where each tokens-per-minute level is written, set again if clamped
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
        if i == 5 then
          tpm_slots[#tpm_slots + 1] = {write = write, at = #write, level = level, limit = limit}
        end
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

-- Budgets: apikey K, org O and the end user (explicit, else the org's default for each end
-- user), owners cluster and org. Blocked once settled spend reaches the block line; a request
-- is refused when its worst case would carry spend past the line, unless it may be clamped:
-- then its output cap is lowered to the most that fits every such budget (never below
-- cap_min), the reservation with it.
if #fields > 4 then
  drop_replaced_defaults(fields, tags, rules)
end
local function refuse(b, why, r)
  return {'budget', fields[b.i], why, b.w, b.used, b.floor, I(r), b.unit}
end
local applicable = {}
local squeezed = {} -- budgets the worst case does not fit, but a lower cap might
for i = 1, #fields do
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
      local b = {i = i, unit = unit, floor = floor, w = w, used = spent + held}
      if spent >= ceil then
        b.used = spent
        return refuse(b, 'blocked', r)
      end
      if spent + held + r > floor then
        if not (clampable and (clamp_asked or string.find(rule, ' clamp$'))) then
          return refuse(b, 'exceeds', r)
        end
        squeezed[#squeezed + 1] = b
      end
      applicable[#applicable + 1] = b
    end
  end
end

local clamped = ''
if #squeezed > 0 then
  local function cost_of(cap)
    -- ceil((A + o * R) / 1e6) in parts that each stay exact in a double
    local o = cap * choices
    local o_q = math.floor(o / 1000000)
    local o_r = o - o_q * 1000000
    local x = a_r + o_r * r_r
    local up = math.floor(x / 1000000)
    if up * 1000000 < x then
      up = up + 1
    end
    return a_q + o * r_q + o_q * r_r + up
  end
  local function misfit(cap)
    local t, c = prompt_tokens + cap * choices, cost_of(cap)
    for _, b in ipairs(squeezed) do
      local r = t
      if b.unit == 'c' then
        r = c
      end
      if b.used + r > b.floor then
        return b
      end
    end
    return nil
  end
  local b = misfit(cap_min)
  if b then
    local r = rt
    if b.unit == 'c' then
      r = rc
    end
    return refuse(b, 'exceeds', r)
  end
  local lo, hi = cap_min, cap_max - 1
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if misfit(mid) then
      hi = mid - 1
    else
      lo = mid
    end
  end
  clamped = lo
  rt, rc = prompt_tokens + lo * choices, cost_of(lo)
  for _, slot in ipairs(tpm_slots) do
    slot.write[slot.at] = string.format('%.17g', slot.level + rt)
  end
  if #tpm_slots > 0 then
    tok_limit, tok_remaining, tok_reset = -1, -1, -1
    for _, slot in ipairs(tpm_slots) do
      local after = slot.level + rt
      local remaining = math.floor(slot.limit - after + EPSILON)
      if tok_limit < 0 or remaining < tok_remaining then
        tok_limit, tok_remaining = slot.limit, remaining
        tok_reset = math.ceil(after * WINDOW_MS[5] / slot.limit - EPSILON)
      end
    end
  end
end

local bud_remaining, bud_line, bud_unit, bud_window, bud_field = '', '', '', '', ''
local tightest = nil
for _, b in ipairs(applicable) do
  local r = rt
  if b.unit == 'c' then
    r = rc
  end
  local remaining = b.floor - b.used - r
  local share = remaining / math.max(b.floor, 1)
  if tightest == nil or share < tightest then
    tightest = share
    bud_remaining, bud_line, bud_unit = remaining, b.floor, b.unit
    bud_window, bud_field = b.w, fields[b.i]
  end
end

local reply = {'ok', req_limit, req_remaining, req_reset, tok_limit, tok_remaining, tok_reset,
  fmt_int(bud_remaining), fmt_int(bud_line), bud_unit, bud_window, bud_field, clamped, I(rt),
  I(rc)}
if dry then
  return reply
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
    tpm_scopes = tpm_scopes .. scope[4]
  end
end
local extra = ''
if tracked then
  extra = user
end
hold(P, lease_tags(kid, extra), rc, rt)
redis.call('HSET', P .. 'lease:' .. rid, 'k', kid, 'c', I(rc), 't', I(rt), 'r', tpm_scopes,
  'pi', I(prompt_tokens), 'm', ARGV[21] or '', 'e', ARGV[22] or '', 'u', ARGV[23] or '',
  'x', extra)
redis.call('ZADD', P .. 'leases', I(now + lease_ms), rid)

return reply
