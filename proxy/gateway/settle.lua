-- settle: replaces one request's reservation with its actual usage, exactly once.
-- Adds actual spend to every window of the key and the org, refunds the unused part of the
-- tokens-per-minute reservation, records threshold crossings (and their webhook outbox
-- entries), appends a usage record and releases the lease. Idempotent by request id: the
-- lease is the proof that a request is still unsettled (a reclaimed lease leaves a marker),
-- so no per-request "done" key has to be kept.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, rid, kid, tokens, cost_nano,
--          window daily, weekly, monthly, ttl daily, weekly, monthly (seconds),
--          now_iso, then the usage record's field/value pairs (appended to the usage stream)
-- Returns  number of budget events recorded, or -1 when this request was already settled

local P = KEYS[1]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local kid = ARGV[3]
local tokens = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local win = {daily = ARGV[6], weekly = ARGV[7], monthly = ARGV[8]}
local ttl = {daily = tonumber(ARGV[9]), weekly = tonumber(ARGV[10]), monthly = tonumber(ARGV[11])}
local now_iso = ARGV[12]

local leased = release_lease(P, rid)
if not leased and redis.call('DEL', P .. 'reclaimed:' .. rid) == 0 then
  return -1
end

-- Tokens per minute: give back what the reservation took beyond actual use (or take the excess).
if leased and leased[4] and leased[4] ~= '' then
  local refund = (tonumber(leased[3]) or 0) - tokens
  for scope in string.gmatch(leased[4], '.') do
    local h = P .. 'rl:o'
    if scope == 'k' then
      h = P .. 'rl:k:' .. leased[1]
    end
    if refund ~= 0 and redis.call('HEXISTS', h, 'tpm') == 1 then
      redis.call('HINCRBYFLOAT', h, 'tpm', -refund)
    end
  end
end

local tags = {'k:' .. kid, 'o'}
for _, tag in ipairs(tags) do
  for period, w in pairs(win) do
    local h = P .. 'spend:' .. tag .. ':' .. w
    redis.call('HINCRBY', h, 'c', cost)
    if redis.call('HINCRBY', h, 't', tokens) == tokens then
      redis.call('EXPIRE', h, ttl[period]) -- a new window (or nothing spent yet)
    end
  end
end

local events = 0
local fields = {'k:' .. kid .. ':cluster', 'k:' .. kid .. ':org', 'o:cluster', 'o:org'}
local rules = redis.call('HMGET', P .. 'budget_rules', unpack(fields))
for i = 1, 4 do
  local rule = rules[i]
  if rule then
    local tag = tags[1]
    if i > 2 then
      tag = tags[2]
    end
    -- Only a budget whose lowest line the spend has reached can have anything to record.
    local period, unit, lowest = string.match(rule, '^(%S+) (%S+) %S+ %S+ (%S+)$')
    local spent = tonumber(redis.call('HGET', P .. 'spend:' .. tag .. ':' .. win[period], unit))
    if spent and spent >= tonumber(lowest) then
      local raw = redis.call('HGET', P .. 'budgets', fields[i])
      events = events + record_crossings(P, cjson.decode(raw), raw, tag, win[period],
        ttl[period], now, now_iso, rid)
    end
  end
end

redis.call('XADD', P .. 'usage', 'MAXLEN', '~', 10000, '*', unpack(ARGV, 13))
return events
