-- settle: replaces one request's reservation with its actual usage, exactly once.
-- Adds actual spend to every window of the key and the org, refunds the unused part of the
-- tokens-per-minute reservation, records threshold crossings (and their webhook outbox
-- entries), appends a usage record and releases the lease. Idempotent by request id.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, rid, kid, tokens, cost_nano,
--          window daily, weekly, monthly, ttl daily, weekly, monthly (seconds),
--          now_iso, usage record fields as JSON (appended to the usage stream)
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
local usage = ARGV[13]

if not redis.call('SET', P .. 'done:' .. rid, '1', 'NX', 'EX', 86400) then
  return -1
end

if release_lease(P, rid) then
  for _, tag in ipairs({'k:' .. kid, 'o'}) do
    local h = P .. 'tpmv:' .. tag
    local reserved = tonumber(redis.call('HGET', h, rid))
    if reserved then
      redis.call('HSET', h, rid, tokens)
      redis.call('HINCRBY', h, '_total', tokens - reserved)
    end
  end
end

local tags = {'k:' .. kid, 'o'}
for _, tag in ipairs(tags) do
  for period, w in pairs(win) do
    local h = P .. 'spend:' .. tag .. ':' .. w
    redis.call('HINCRBY', h, 'c', cost)
    redis.call('HINCRBY', h, 't', tokens)
    redis.call('EXPIRE', h, ttl[period])
  end
end

local events = 0
local fields = {'k:' .. kid .. ':cluster', 'k:' .. kid .. ':org', 'o:cluster', 'o:org'}
local budgets = redis.call('HMGET', P .. 'budgets', unpack(fields))
for i = 1, 4 do
  local raw = budgets[i]
  if raw then
    local b = cjson.decode(raw)
    local tag = tags[1]
    if i > 2 then
      tag = tags[2]
    end
    events = events + record_crossings(P, b, raw, tag, win[b.period], ttl[b.period], now,
      now_iso, rid)
  end
end

redis.call('XADD', P .. 'usage', 'MAXLEN', '~', 10000, '*', 'r', usage)
return events
