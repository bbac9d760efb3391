local USAGE_KEPT = 10000

local function append_usage(P, pairs)
  redis.call('XADD', P .. K.usage, 'MAXLEN', '~', USAGE_KEPT, '*', unpack(pairs))
end

-- The same from arguments (args[from] onwards; args defaults to ARGV), without copying them.
local function append_usage_args(P, from, args)
  redis.call('XADD', P .. K.usage, 'MAXLEN', '~', USAGE_KEPT, '*', unpack(args or ARGV, from))
end

-- Usage counters: what the usage and cost reports read (layout and reading in
-- proxy/ledger/usage.py). Written here, by every charge path, in the same atomic step that adds
-- the spend, so reports equal spend exactly. One hash per org, width and bucket start (UTC
-- epoch seconds): K.counters .. "m:<start>" (and h, d). A field per combination
-- "<key id>\31<model>\31<endpoint>\31<end user>" holds "requests input cached output cost" as
-- one packed value: one HGET and one HSET per width, whatever the number of metrics, and a
-- quarter of the fields (and memory) of a field per metric. Fields starting with \31 are the
-- bucket's end-user index. A sum that would pass 2^53 - 1 (or a value no script wrote) goes
-- on in a spill field "<combination>\31<n>", which readers add to the combination.
--
-- W.usage is the policy, "<keep 1m> <keep 1h> <keep 1d> <end-user cap>": a bucket is kept
-- for its width plus its keep (seconds), and a bucket records at most <cap> distinct end users,
-- later ones as "(other)".

local USAGE_OTHER = '(other)'
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
    local h = P .. K.counters .. w[1] .. ':' .. I(start)
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
