-- webhook_outbox: the life of one webhook outbox entry, one atomic step at a time.
-- budget_events.lua creates the record (status "pending") and its outbox entry; this script
-- claims an attempt, and records its success or failure. The outbox score is the time the
-- entry may next be claimed: a claim pushes it to the claim's expiry, so a process that dies
-- mid-attempt leaves an entry another process claims once the expiry passes.
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     op, event id, now_ms, then by op:
--   claim    claim_until_ms, worker, token
--            -> {event JSON, budget JSON, attempts, created_ms}, or false when not due,
--               taken by another process, or finished
--   ack      keep_s                    -> 1, or 0 when already delivered or gone
--   fail     token, error, retry_at_ms, give_up (0|1), keep_s
--            -> "retry" | "failed" | "stale" (the claim was lost to another process)
--   release  token                     -> 1 when handed back for an immediate new claim

local P = KEYS[1]
local op, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local outbox = P .. K.outbox
local rec = P .. K.delivery .. id
local index = P .. K.whlog
local INDEX_KEPT = 10000

local function unclaim()
  redis.call('HDEL', rec, 'claim_token', 'claimed_by', 'claimed_until')
end

-- Delivered or failed: out of the queue, kept for inspection for keep_s seconds.
local function finish(keep_s)
  redis.call('ZREM', outbox, id)
  unclaim()
  redis.call('EXPIRE', rec, keep_s)
  local created = redis.call('HGET', rec, 'created_ms') or now
  redis.call('ZADD', index, created, id)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - keep_s * 1000)
  redis.call('ZREMRANGEBYRANK', index, 0, -INDEX_KEPT - 1)
end

if op == 'claim' then
  local due = redis.call('ZSCORE', outbox, id)
  if not due or tonumber(due) > now then
    return false
  end
  local f = redis.call('HMGET', rec, 'status', 'event', 'budget', 'created_ms')
  if f[1] ~= 'pending' or not f[2] or not f[3] then
    redis.call('ZREM', outbox, id)
    return false
  end
  local attempts = redis.call('HINCRBY', rec, 'attempts', 1)
  redis.call('HSET', rec, 'claimed_until', ARGV[4], 'claimed_by', ARGV[5], 'claim_token', ARGV[6],
    'last_attempt_ms', now)
  redis.call('ZADD', outbox, ARGV[4], id)
  redis.call('ZADD', index, 'NX', f[4] or now, id)
  return {f[2], f[3], attempts, f[4] or tostring(now)}
end

if op == 'ack' then
  local status = redis.call('HGET', rec, 'status')
  if not status then
    redis.call('ZREM', outbox, id)
    return 0
  end
  if status == 'delivered' then
    return 0
  end
  -- A 2xx wins even over a claim lost meanwhile: the receiver has the event.
  redis.call('HSET', rec, 'status', 'delivered', 'delivered_ms', now)
  finish(tonumber(ARGV[4]))
  return 1
end

if op == 'fail' then
  local f = redis.call('HMGET', rec, 'status', 'claim_token')
  if f[1] ~= 'pending' or f[2] ~= ARGV[4] then
    return 'stale'
  end
  redis.call('HSET', rec, 'last_error', ARGV[5])
  if ARGV[7] == '1' then
    redis.call('HSET', rec, 'status', 'failed', 'failed_ms', now)
    finish(tonumber(ARGV[8]))
    return 'failed'
  end
  unclaim()
  redis.call('ZADD', outbox, ARGV[6], id)
  return 'retry'
end

if op == 'release' then
  local f = redis.call('HMGET', rec, 'status', 'claim_token')
  if f[1] ~= 'pending' or f[2] ~= ARGV[4] then
    return 0
  end
  unclaim()
  redis.call('ZADD', outbox, now, id)
  return 1
end

return redis.error_reply('webhook_outbox: unknown op ' .. tostring(op))
