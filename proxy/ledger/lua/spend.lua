-- Spend: charging is the single way spend enters the books (settle, reclaim, late correction),
-- and the threshold crossings a charge causes are recorded in the same step (events.lua).

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
      local h = P .. K.spend .. tag .. ':' .. w
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
    fields = {k .. OWN1, k .. OWN2, ORG_FIELD1, ORG_FIELD2}
    field_tags = {k, k, TAG.org, TAG.org}
  else
    fields, field_tags = budget_fields(tags)
  end
  local rules = redis.call('HMGET', P .. K.budget_rules, unpack(fields))
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
      local spent = w and exact_int(redis.call('HGET', P .. K.spend .. field_tags[i] .. ':' .. w,
        unit))
      if spent and lowest and spent >= lowest then
        local raw = redis.call('HGET', P .. K.budgets, fields[i])
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
