-- settle: replaces one request's reservation with its actual usage, exactly once.
-- Adds actual spend to every window of the key and the org, refunds the unused part of the
-- tokens-per-minute reservation, records threshold crossings (and their webhook outbox
-- entries), appends a usage record and releases the lease. Idempotent by lease: the lease is
-- the proof that a request is still unsettled (a reclaimed lease leaves a marker), so no
-- per-request "done" key has to be kept.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     now_ms, lease (as admit returned it), tokens, cost_nano,
--          window daily, weekly, monthly, ttl daily, weekly, monthly (seconds),
--          now_iso, then the usage record's field/value pairs (appended to the usage stream)
-- Returns  number of budget events recorded, or -1 when this request was already settled

local P = KEYS[1]
local now = tonumber(ARGV[1])
local lease = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local win = {daily = ARGV[5], weekly = ARGV[6], monthly = ARGV[7]}
local ttl = {daily = tonumber(ARGV[8]), weekly = tonumber(ARGV[9]), monthly = tonumber(ARGV[10])}
local now_iso = ARGV[11]
local TPM_MS = 60000

local rid, admitted_ms, _, reserved, tpm_scopes, kid = parse_lease(lease)
local leased = release_lease(P, lease)
if not leased and redis.call('DEL', P .. 'reclaimed:' .. rid) == 0 then
  return -1
end

-- Refund (or charge) the difference in the tokens-per-minute logs that hold the reservation:
-- a member at the reservation's own time, so both leave the window together. Past the window
-- the reservation has left (or is about to leave) on its own and there is nothing to correct.
local delta = tokens - reserved
if leased and delta ~= 0 and now - admitted_ms < TPM_MS then
  for scope in string.gmatch(tpm_scopes, '%a') do
    local tag = 'o'
    if scope == 'k' then
      tag = 'k:' .. kid
    end
    redis.call('ZADD', P .. 'tpm:' .. tag, admitted_ms, rid .. '+ ' .. string.format('%.0f', delta))
    redis.call('INCRBY', P .. 'tpmt:' .. tag, string.format('%.0f', delta))
  end
end

local tags = {'k:' .. kid, 'o'}
local spent = {}
for _, tag in ipairs(tags) do
  spent[tag] = {}
  for period, w in pairs(win) do
    local h = P .. 'spend:' .. tag .. ':' .. w
    local t = redis.call('HINCRBY', h, 't', tokens)
    spent[tag][period] = {c = redis.call('HINCRBY', h, 'c', cost), t = t}
    if t == tokens then
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
    if spent[tag][period][unit] >= tonumber(lowest) then
      local raw = redis.call('HGET', P .. 'budgets', fields[i])
      events = events + record_crossings(P, cjson.decode(raw), raw, tag, win[period],
        ttl[period], now, now_iso, rid)
    end
  end
end

redis.call('XADD', P .. 'usage', 'MAXLEN', '~', 10000, '*', unpack(ARGV, 12))
return events
