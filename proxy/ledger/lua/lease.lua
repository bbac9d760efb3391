-- The ledger's shared functions, prepended to admit.lua, settle.lua and reclaim.lua (after
-- budget_events.lua). A lease is one admitted request's reservation: in-flight cost, tokens
-- and a concurrency slot on every scope it counts against (the key, the org, any extra tags).
-- Releasing it is the single way reservations leave the books; charging is the single way
-- spend enters them.
--
local MARKER_TTL = 8 * 86400 -- a reclaimed request may still settle late (spool replay)

local LEASE_FIELDS = {'k', 'c', 't', 'r', 'pi', 'm', 'e', 'u', 'x'}

-- The lease of rid, or nil and why: 'missing' (settled or never written) or 'malformed'.
local function read_lease(P, rid)
  local v = redis.call('HMGET', P .. 'lease:' .. rid, unpack(LEASE_FIELDS))
  if not v[1] then
    if redis.call('EXISTS', P .. 'lease:' .. rid) == 1 then
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

-- Scopes a lease counts against: "k:<key>", "o", then its extra tags (space-separated).
local function lease_tags(kid, extra)
  local tags = {'k:' .. kid, 'o'}
  for tag in string.gmatch(extra or '', '%S+') do
    tags[#tags + 1] = tag
  end
  return tags
end

-- End users. An end user named by X-On-Behalf-Of counts as the tag "u:<hex of the id's UTF-8
-- bytes>" (nothing in it can break a key name, a field or the org's hash tag); their budgets
-- are the fields "u:<hex>:<owner>" (explicit) and "ud:<owner>" (the org's default for each end
-- user). Only a lease whose org budgets or limits its end users carries the tag (see admit.lua).
local function end_user_tag_in(extra)
  return string.match(extra or '', '(u:%x+)')
end

local function end_user_id(tag)
  return (string.gsub(string.sub(tag, 3), '%x%x', function(h)
    return string.char(tonumber(h, 16))
  end))
end

-- The budget fields over these scope tags, each with the tag whose spend it judges: both owners
-- of every tag, and for an end user also the org's default for each end user.
local function budget_fields(tags)
  local fields, field_tags = {}, {}
  for _, tag in ipairs(tags) do
    for _, owner in ipairs({'cluster', 'org'}) do
      fields[#fields + 1] = tag .. ':' .. owner
      field_tags[#field_tags + 1] = tag
    end
    if string.sub(tag, 1, 2) == 'u:' then
      for _, owner in ipairs({'cluster', 'org'}) do
        fields[#fields + 1] = 'ud:' .. owner
        field_tags[#field_tags + 1] = tag
      end
    end
  end
  return fields, field_tags
end

-- An explicit end-user budget replaces the default of the same owner and period for that end
-- user (a default of another period still applies): such defaults' rules become false.
local function drop_replaced_defaults(fields, field_tags, rules)
  local at = {}
  for i = 1, #fields do
    at[fields[i]] = i
  end
  for i = 1, #fields do
    local owner = string.match(fields[i], '^ud:(%a+)$')
    if owner and rules[i] then
      local e = at[field_tags[i] .. ':' .. owner]
      if e and rules[e] and string.match(rules[e], '^%S+') == string.match(rules[i], '^%S+') then
        rules[i] = false
      end
    end
  end
end

-- Where an end-user budget's events go: an explicit budget's to the end user's own list, the
-- default's to the default's list, remembered per end user; both name the end user.
local function event_target(field, tag)
  if string.sub(field, 1, 3) == 'ud:' then
    return {id = end_user_id(tag), list = 'ud', each = true}
  end
  if string.sub(tag, 1, 2) == 'u:' then
    return {id = end_user_id(tag), list = tag}
  end
  return nil
end

-- An in-flight hash rebuilt from the org's live leases: for a counter that holds something no
-- script wrote (it would otherwise fail every admission of the org).
local function heal_inflight(P, tag)
  local n, c, t = 0, 0, 0
  for _, rid in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
    local l = read_lease(P, rid)
    if l then
      for _, other in ipairs(lease_tags(l.k, l.x)) do
        if other == tag then
          n, c, t = n + 1, c + l.c, t + l.t
        end
      end
    end
  end
  local h = P .. 'infl:' .. tag
  redis.call('DEL', h)
  if n > 0 then
    redis.call('HSET', h, 'n', I(n), 'c', I(c), 't', I(t))
  end
  redis.log(redis.LOG_WARNING, 'llm-proxy: rebuilt corrupt in-flight counters ' .. h)
end

-- In-flight {n, c, t} of a scope, healed first if a field is not an exact integer or the
-- count exceeds the org's live leases (a counter left behind: it would refuse forever).
local function read_inflight(P, tag)
  local v = redis.call('HMGET', P .. 'infl:' .. tag, 'n', 'c', 't')
  local n, c, t = exact_int(v[1] or 0), exact_int(v[2] or 0), exact_int(v[3] or 0)
  if not (n and c and t) or n < 0 or (n > 0 and n > redis.call('ZCARD', P .. 'leases'))
      or (n == 0 and (c ~= 0 or t ~= 0)) then
    heal_inflight(P, tag)
    v = redis.call('HMGET', P .. 'infl:' .. tag, 'n', 'c', 't')
    n, c, t = exact_int(v[1] or 0), exact_int(v[2] or 0), exact_int(v[3] or 0)
  end
  return {n = n, c = c, t = t}
end

-- known: the in-flight counters this script read (read_inflight) and has not changed since,
-- by tag: then one HSET per scope rather than three HINCRBYs, unless a sum would pass what a
-- double holds exactly.
local function hold(P, tags, cost, tokens, known)
  for _, tag in ipairs(tags) do
    local h = P .. 'infl:' .. tag
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
    local h = P .. 'infl:' .. tag
    local left = redis.pcall('HINCRBY', h, 'n', -1)
    if type(left) ~= 'number' or left <= 0 then
      redis.call('DEL', h) -- nothing in flight (or a corrupt counter): no hash kept per idle scope
    else
      redis.pcall('HINCRBY', h, 'c', c_arg)
      redis.pcall('HINCRBY', h, 't', t_arg)
    end
  end
  redis.call('DEL', P .. 'lease:' .. l.rid)
  redis.call('ZREM', P .. 'leases', l.rid)
end

-- A record that cannot be processed is set aside, never in the way of the next admission:
-- out of the expiry index, kept (with the reason) for an operator; the sweeper reports it.
-- Whatever it held in flight is unknown, so the counters it may be part of are rebuilt.
local function set_aside(P, rid, now, why)
  redis.call('ZREM', P .. 'leases', rid)
  redis.call('ZADD', P .. 'leases:stuck', I(now), rid)
  redis.call('HSET', P .. 'leases:stuck:why', rid, why)
  local kx = redis.call('HMGET', P .. 'lease:' .. rid, 'k', 'x')
  heal_inflight(P, 'o')
  if kx[1] then
    heal_inflight(P, 'k:' .. kx[1])
  end
  for tag in string.gmatch(kx[2] or '', '%S+') do
    heal_inflight(P, tag)
  end
end

-- Tokens per minute: give back what the reservation took beyond actual use (or take the excess).
local function refund_tpm(P, l, tokens)
  local refund = l.t - tokens
  if refund == 0 or l.r == '' then
    return
  end
  for scope in string.gmatch(l.r, '.') do
    local h = P .. 'rl:o'
    if scope == 'k' then
      h = P .. 'rl:k:' .. l.k
    elseif scope == 'u' then
      h = P .. 'rl:' .. (end_user_tag_in(l.x) or 'u:')
    end
    if redis.call('HEXISTS', h, 'tpm') == 1 then
      redis.pcall('HINCRBYFLOAT', h, 'tpm', string.format('%.17g', -refund))
    end
  end
end

-- W: {win = {daily=, weekly=, monthly=}, ttl = {daily=, weekly=, monthly=}}
local function windows_from(args, at)
  return {
    win = {daily = args[at], weekly = args[at + 1], monthly = args[at + 2]},
    ttl = {daily = exact_int(args[at + 3]), weekly = exact_int(args[at + 4]),
      monthly = exact_int(args[at + 5])},
  }
end

local function add_spend(P, tags, tokens, cost, W, only_existing)
  local c_arg, t_arg = I(cost), I(tokens)
  for _, tag in ipairs(tags) do
    for period, w in pairs(W.win) do
      local h = P .. 'spend:' .. tag .. ':' .. w
      if not only_existing or redis.call('EXISTS', h) == 1 then
        redis.pcall('HINCRBY', h, 'c', c_arg)
        local t = redis.pcall('HINCRBY', h, 't', t_arg)
        if t == tokens and not only_existing then
          redis.call('EXPIRE', h, I(W.ttl[period])) -- a new window (or nothing spent yet)
        end
      end
    end
  end
end

-- Threshold crossings of every budget on these scopes whose lowest line the spend has reached.
-- A budget record that cannot be read is skipped (and logged), never fatal to the settle.
local function check_budgets(P, tags, W, now, now_iso, seed)
  local fields, field_tags
  if #tags == 2 then -- a key and its org (no end user): the common case, spelled out
    local k = tags[1]
    fields = {k .. ':cluster', k .. ':org', 'o:cluster', 'o:org'}
    field_tags = {k, k, 'o', 'o'}
  else
    fields, field_tags = budget_fields(tags)
  end
  local rules = redis.call('HMGET', P .. 'budget_rules', unpack(fields))
  if #fields > 4 then
    drop_replaced_defaults(fields, field_tags, rules)
  end
  local events = 0
  for i = 1, #fields do
    local rule = rules[i]
    if rule then
      local period, unit, lowest = string.match(rule, '^(%S+) (%S+) %S+ %S+ (%S+)')
      local w = period and W.win[period]
      lowest = exact_int(lowest)
      local spent = w and exact_int(redis.call('HGET', P .. 'spend:' .. field_tags[i] .. ':' .. w,
        unit))
      if spent and lowest and spent >= lowest then
        local raw = redis.call('HGET', P .. 'budgets', fields[i])
        local ok, n = pcall(function()
          return record_crossings(P, cjson.decode(raw), raw, field_tags[i], w, W.ttl[period], now,
            now_iso, seed, event_target(fields[i], field_tags[i]))
        end)
        if ok then
          events = events + n
        else
          redis.log(redis.LOG_WARNING, 'llm-proxy: budget ' .. fields[i] .. ' unreadable: ' ..
            tostring(n))
        end
      end
    end
  end
  return events
end

local USAGE_KEPT = 10000

local function append_usage(P, pairs)
  redis.call('XADD', P .. 'usage', 'MAXLEN', '~', USAGE_KEPT, '*', unpack(pairs))
end

-- The same from the script's own arguments (ARGV[from] onwards), without copying them.
local function append_usage_args(P, from)
  redis.call('XADD', P .. 'usage', 'MAXLEN', '~', USAGE_KEPT, '*', unpack(ARGV, from))
end

-- Usage counters: what the usage and cost reports read (layout and reading in
-- proxy/store/usage.py). Written here, by every charge path, in the same atomic step that adds
-- the spend, so reports equal spend exactly. One hash per org, width and bucket start (UTC
-- epoch seconds): "usage:m:<start>", "usage:h:<start>", "usage:d:<start>". A field per combination
-- "<key id>\31<model>\31<endpoint>\31<end user>" holds "requests input cached output cost" as
-- one packed value: one HGET and one HSET per width, whatever the number of metrics, and a
-- quarter of the fields (and memory) of a field per metric. Fields starting with \31 are the
-- bucket's end-user index. A sum that would pass 2^53 - 1 (or a value no script wrote) goes
-- on in a spill field "<combination>\31<n>", which readers add to the combination.
--
-- W.usage is the policy, "<keep 1m> <keep 1h> <keep 1d> <end-user cap>": a bucket is kept
-- for its width plus its keep (seconds), and a bucket records at most <cap> distinct end users,
-- later ones as "(other)".

local USAGE_SEP = '\31'
local USAGE_OTHER = '(other)'
local USAGE_WIDTHS = {{'m', 60}, {'h', 3600}, {'d', 86400}}
local USAGE_SPILLS = 8

local function usage_policy(s)
  local p = {}
  for n in string.gmatch(s or '', '%d+') do
    p[#p + 1] = tonumber(n)
  end
  if #p ~= 4 then
    return {172800, 3024000, 34560000, 1000} -- the configuration's defaults
  end
  return p
end

local USAGE_FORMAT = '%d %d %d %d %d' -- %d: exact for integers, never "-0" nor "1e+17"
local USAGE_VALUE = '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$'

local function exact_all(a, b, c, d, e)
  return a <= MAX_EXACT and a >= -MAX_EXACT and b <= MAX_EXACT and b >= -MAX_EXACT
    and c <= MAX_EXACT and c >= -MAX_EXACT and d <= MAX_EXACT and d >= -MAX_EXACT
    and e <= MAX_EXACT and e >= -MAX_EXACT
end

-- Adds d to field f of h, whose current value is v (nil: absent), or to the first spill field
-- that takes it exactly (a value past 2^53 - 1, or one no script wrote, is left as it is).
local function bump_usage(h, f, v, d)
  local field = f
  for spill = 1, USAGE_SPILLS do
    if not v then
      redis.call('HSET', h, field, string.format(USAGE_FORMAT, d[1], d[2], d[3], d[4], d[5]))
      return
    end
    local r, i, c, o, k = string.match(v, USAGE_VALUE)
    if r then
      r, i, c, o, k = r + d[1], i + d[2], c + d[3], o + d[4], k + d[5]
      if exact_all(r, i, c, o, k) then
        redis.call('HSET', h, field, string.format(USAGE_FORMAT, r, i, c, o, k))
        return
      end
    end
    field = f .. USAGE_SEP .. spill
    v = redis.call('HGET', h, field)
  end
  redis.log(redis.LOG_WARNING, 'llm-proxy: usage counter ' .. h .. ' has no room for ' .. f)
end

-- Whether end user u may have rows of its own in bucket h (fewer than cap distinct so far).
local function end_user_fits(h, u, cap)
  local mark = USAGE_SEP .. 'u' .. USAGE_SEP .. u
  if redis.call('HEXISTS', h, mark) == 1 then
    return true
  end
  if redis.call('HINCRBY', h, USAGE_SEP .. 'users', 1) > cap then
    return false
  end
  redis.call('HSET', h, mark, '1')
  return true
end

-- Adds one charge d = {requests, input, cached, output, cost} at at_ms to the org's minute,
-- hour and day buckets (a bucket past its keep at ttl_now_ms is not written). Returns the
-- end-user label each width recorded, for a reclaim's marker. With labels (a late correction
-- of a reclaimed charge: requests 0, the rest deltas that may be negative), d goes to exactly
-- the fields the reclaim wrote, where they still exist.
local function add_usage(P, at_ms, ttl_now_ms, policy_arg, kid, model, endpoint, user, d, labels)
  if string.find(model, USAGE_SEP, 1, true) then
    model = string.gsub(model, USAGE_SEP, '?')
  end
  local at, now = math.floor(at_ms / 1000), math.floor(ttl_now_ms / 1000)
  local combo = kid .. USAGE_SEP .. model .. USAGE_SEP .. endpoint .. USAGE_SEP
  local used, policy = {}, nil
  local f = combo .. user
  for i, w in ipairs(USAGE_WIDTHS) do
    local start = at - at % w[2]
    local h = P .. 'usage:' .. w[1] .. ':' .. I(start)
    local u = user
    if labels then
      u = labels[i] or ''
      f = combo .. u
    elseif i > 1 and used[i - 1] ~= user then
      f = combo .. user -- the previous width had recorded this end user as "(other)"
    end
    local v = redis.call('HGET', h, f)
    if v or labels then
      if v then
        bump_usage(h, f, v, d)
      end
    else
      policy = policy or usage_policy(policy_arg)
      local ttl = start + w[2] + policy[i] - now
      if ttl > 0 then
        if u ~= '' and u ~= USAGE_OTHER and not end_user_fits(h, u, policy[4]) then
          u = USAGE_OTHER
          f = combo .. u
          v = redis.call('HGET', h, f)
        end
        bump_usage(h, f, v, d)
        redis.call('EXPIRE', h, I(ttl))
      end
    end
    used[i] = u
  end
  return used
end

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
  local marker = P .. 'reclaimed:' .. l.rid
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
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', I(now), 'LIMIT', 0, limit)
  local reclaimed, set_aside_n = 0, 0
  for _, rid in ipairs(expired) do
    local l, why = read_lease(P, rid)
    if l then
      reclaim_lease(P, l, W, now, now_iso)
      reclaimed = reclaimed + 1
    elseif why == 'missing' then
      redis.call('ZREM', P .. 'leases', rid)
    else
      set_aside(P, rid, now, why)
      set_aside_n = set_aside_n + 1
    end
  end
  return reclaimed, set_aside_n
end
