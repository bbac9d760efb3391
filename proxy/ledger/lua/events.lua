-- Budget events, shared by admit, settle, reclaim and budget_put (composed at load time).
-- Records each threshold crossing at most once per (budget, window) as a BudgetEvent, and
-- enqueues its webhook delivery in the same atomic step (the per-org outbox).

local EVENTS_KEPT = 1000

local function decimal_string(n, unit)
  if unit == 't' then
    return string.format('%.0f', n)
  end
  local whole = math.floor(n / 1000000000)
  local frac = n - whole * 1000000000
  if frac == 0 then
    return string.format('%.0f', whole)
  end
  local digits = string.format('%09.0f', frac):gsub('0+$', '')
  return string.format('%.0f', whole) .. '.' .. digits
end

local END_USER_EVENTS_TTL = 40 * 86400 -- an end user's events outlive the longest window

-- b: decoded budget; raw: its JSON; tag: spend scope tag; w: window id of b.period;
-- fired_ttl: seconds the fired-set lives; seed: unique per call, for event ids.
-- target (end-user budgets only): {id = the end user, list = events list tag, each = true
-- for the per-end-user default, whose crossings are remembered per end user}.
local function record_crossings(P, b, raw, tag, w, fired_ttl, now_ms, now_iso, seed, target)
  local spent = tonumber(redis.call('HGET', P .. K.spend .. tag .. ':' .. w, b.unit)) or 0
  local fired_key = P .. K.fired .. b.id .. ':' .. w
  if target and target.each then
    fired_key = P .. K.fired .. b.id .. ':' .. tag .. ':' .. w
  end
  local n = 0
  for j, th in ipairs(b.lines) do
    if spent >= th.at and redis.call('SADD', fired_key, th.pct .. ':' .. th.action) == 1 then
      redis.call('EXPIRE', fired_key, fired_ttl)
      n = n + 1
      local kind = 'threshold_alert'
      if th.action == 'block' then
        kind = 'blocked'
      end
      local event = {
        id = 'evt_' .. seed .. '_' .. b.id .. '_' .. j,
        budget_id = b.id,
        type = kind,
        pct = th.pct,
        period_key = w,
        spend_snapshot = decimal_string(spent, b.unit),
        limit_snapshot = b.limit_str,
        created_at = now_iso,
      }
      local events_key = P .. K.events .. tag
      if target then
        event.target_id = target.id
        events_key = P .. K.events .. target.list
      end
      local encoded = cjson.encode(event)
      redis.call('LPUSH', events_key, encoded)
      redis.call('LTRIM', events_key, 0, EVENTS_KEPT - 1)
      if target and not target.each then
        redis.call('EXPIRE', events_key, END_USER_EVENTS_TTL) -- no list left per idle end user
      end
      if b.alert_webhook_url and b.alert_webhook_url ~= cjson.null then
        redis.call('HSET', P .. K.delivery .. event.id, 'event', encoded, 'budget', raw,
          'status', 'pending', 'attempts', 0, 'created_ms', now_ms)
        redis.call('ZADD', P .. K.outbox, now_ms, event.id)
      end
    end
  end
  return n
end
