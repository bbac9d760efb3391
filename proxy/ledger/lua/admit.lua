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
--          end-user tag ("u:<hex>", "" = none),
--          flags ("d": dry run, decide and write nothing; "c": the request accepts a lower
--          output cap on any budget),
--          clamp terms ("" = the output cap cannot be lowered; else "choices cap lowest A_q A_r
--          R_q R_r": the cap per choice reserved, the lowest it may go, and the cost function
--          cost(output) = ceil((A + output * R) / 1e6) as A and R divided by 1e6 with remainder),
--          usage counters' policy (see add_usage: a reclaimed lease is charged and reported)
--
-- Returns  {"ok", req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--           tok_reset_ms, budget_remaining, budget_line, budget_unit, budget_window, budget_field,
--           clamped cap per choice, reserved tokens, reserved cost ("" each when not clamped)}
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
W.usage = ARGV[27]
local now_iso = ARGV[19]
local prompt_tokens = exact_int(ARGV[20])
local user = ARGV[24] or ''
local flags = ARGV[25] or ''
local clamp_terms = ARGV[26] or ''
local NUMBERS = {'now_ms', now, 'reserve_tokens', rt, 'reserve_cost_nano', rc, 'lease_ms',
  lease_ms, 'prompt_tokens', prompt_tokens}
for i = 2, 10, 2 do
  local value = NUMBERS[i]
  if not value or value < 0 then
    return {'invalid', NUMBERS[i - 1]}
  end
end
if user ~= '' and not string.match(user, '^u:%x+$') then
  return {'invalid', 'end_user'}
end
local dry = flags ~= '' and string.find(flags, 'd', 1, true) ~= nil
local clamp_asked = flags ~= '' and string.find(flags, 'c', 1, true) ~= nil
-- Clamping lowers the cap per choice within [lowest, cap); the caller guarantees that the
-- reservation is prompt + cap * choices tokens costing cost(cap * choices). Read only when a
-- budget is squeezed.
local clampable = clamp_terms ~= ''

local function fmt_int(x)
  if x == '' then
    return ''
  end
  return I(x)
end

-- Already admitted (a retried call), or already settled: an admit that reaches Redis after
-- its request gave up on it (and released it) must not reserve again.
if redis.call('EXISTS', P .. 'lease:' .. rid, P .. 'done:' .. rid) > 0 then
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
-- The org's policy hash: its own limits, then its end-user policy (proxy/store/end_users.py):
-- whether requests must name an end user, and whether the org has ever had an end-user
-- budget or policy (u_on). Only then does a named end user cost anything more to check.
local of = redis.call('HMGET', P .. 'limits', 'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency',
  'u_required', 'u_on')
if user == '' and of[7] == '1' then
  return {'need_user'}
end
if of[8] ~= '1' then
  user = '' -- the org has no rule for its end users: nothing to check or keep for them
end
local org_limits = {}
for i = 1, 6 do
  org_limits[i] = exact_int(of[i])
end

-- Budgets that may apply: the key's, the org's and, for a named end user, theirs and the
-- org's default for each end user (see budget_fields in lease.lua).
local fields, tags
if user == '' then
  fields = {'k:' .. kid .. ':cluster', 'k:' .. kid .. ':org', 'o:cluster', 'o:org'}
  tags = {'k:' .. kid, 'k:' .. kid, 'o', 'o'}
else
  fields, tags = budget_fields({'k:' .. kid, 'o', user})
end
local rules = redis.call('HMGET', P .. 'budget_rules', unpack(fields))

-- An end user counts as a scope of its own (in-flight, spend windows, rate limits) only where
-- the org asks for it: a budget or limit that applies to them, or u_track. Everyone else's
-- requests cost nothing more than without the header.
local tracked = false
local user_limits = {}
if user ~= '' then
  local uf = redis.call('HMGET', P .. 'limits', 'u_track', 'u_rps', 'u_rpm', 'u_rph', 'u_rpd',
    'u_tpm', 'u_concurrency')
  tracked = uf[1] == '1'
  for i = 1, 6 do
    user_limits[i] = exact_int(uf[1 + i])
    tracked = tracked or user_limits[i] ~= nil
  end
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
        if i == 5 and clampable then
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
if tracked then
  drop_replaced_defaults(fields, tags, rules)
end
local function refuse(b, why, r)
  return {'budget', fields[b.i], why, b.w, b.used, b.floor, I(r), b.unit}
end
local bud_remaining, bud_line, bud_unit, bud_window, bud_field = '', '', '', '', ''
local tightest = nil
local function tighter(i, unit, floor, w, remaining)
  local share = remaining / math.max(floor, 1)
  if tightest == nil or share < tightest then
    tightest = share
    bud_remaining, bud_line, bud_unit, bud_window, bud_field = remaining, floor, unit, w, fields[i]
  end
end
local applicable = {} -- kept only where the cap may be lowered: the tightest is then redone
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
      if spent >= ceil then
        return refuse({i = i, unit = unit, floor = floor, w = w, used = spent}, 'blocked', r)
      end
      local used = spent + held
      if used + r > floor then
        local b = {i = i, unit = unit, floor = floor, w = w, used = used}
        if not (clampable and (clamp_asked or string.find(rule, ' clamp$'))) then
          return refuse(b, 'exceeds', r)
        end
        squeezed[#squeezed + 1] = b
        applicable[#applicable + 1] = b
      else
        tighter(i, unit, floor, w, floor - used - r)
        if clampable then
          applicable[#applicable + 1] = {i = i, unit = unit, floor = floor, w = w, used = used}
        end
      end
    end
  end
end

local clamped, reserved_t, reserved_c = '', '', ''
if #squeezed > 0 then
  local terms = {}
  for part in string.gmatch(clamp_terms, '%S+') do
    terms[#terms + 1] = exact_int(part)
  end
  local choices, cap_max, cap_min, a_q, a_r, r_q, r_r = unpack(terms)
  for j = 1, 7 do
    if not terms[j] or terms[j] < 0 then
      return {'invalid', 'clamp_terms'}
    end
  end
  if choices < 1 or cap_min < 1 or cap_min >= cap_max then
    return {'invalid', 'clamp_terms'}
  end
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
  rt, rc = prompt_tokens + lo * choices, cost_of(lo)
  clamped, reserved_t, reserved_c = lo, I(rt), I(rc)
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
  tightest = nil
  for _, a in ipairs(applicable) do
    local r = rt
    if a.unit == 'c' then
      r = rc
    end
    tighter(a.i, a.unit, a.floor, a.w, a.floor - a.used - r)
  end
end

local reply = {'ok', req_limit, req_remaining, req_reset, tok_limit, tok_remaining, tok_reset,
  fmt_int(bud_remaining), fmt_int(bud_line), bud_unit, bud_window, bud_field, clamped,
  reserved_t, reserved_c}
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
hold(P, lease_tags(kid, extra), rc, rt, inflight)
redis.call('HSET', P .. 'lease:' .. rid, 'k', kid, 'c', I(rc), 't', I(rt), 'r', tpm_scopes,
  'pi', I(prompt_tokens), 'm', ARGV[21] or '', 'e', ARGV[22] or '', 'u', ARGV[23] or '',
  'x', extra)
redis.call('ZADD', P .. 'leases', I(now + lease_ms), rid)

return reply
