-- settle_one: replaces one request's reservation with its actual usage, exactly once.
-- Adds actual spend to every window of every scope the lease counted against, refunds the
-- unused part of the tokens-per-minute reservation, records threshold crossings (and their
-- webhook outbox entries), appends a usage record and releases the lease. Idempotent by
-- request id: the lease is the proof that a request is still unsettled, so no per-request
-- "done" key has to be kept. A lease reclaimed meanwhile (its proxy looked dead) was charged
-- its whole reservation and left a marker: this settle then corrects that charge to the
-- actual usage, once.
--
-- A (one settle's arguments)  see SettleArgs in proxy/ledger/args.py (the only place that builds
-- them); settle.lua passes its ARGV, settle_batch.lua one item's slice of its ARGV.
-- Returns  number of budget events recorded, or -1 when this request was already settled

local function settle_one(P, A)
  local DONE_TTL = 3600
  local now = exact_int(A[1])
  local rid = A[2]
  local kid = A[3]
  local tokens = exact_int(A[4])
  local cost = exact_int(A[5])
  local W = windows_from(A, 6)
  local now_iso = A[12]
  if not (now and tokens and cost and W.ttl.daily and W.ttl.weekly and W.ttl.monthly)
      or tokens < 0 or cost < 0 then
    return redis.error_reply('settle: numbers must be exact non-negative integers')
  end
  W.usage = A[19]
  local u_in, u_cached, u_out = exact_int(A[13]) or 0, exact_int(A[14]) or 0,
    exact_int(A[15]) or 0
  local u_model, u_endpoint, u_user = A[16], A[17], A[18]
  local clock_ms = exact_int(A[20]) or now
  local RECORD_AT = 21 -- the usage record's pairs: A[21] onwards

  local lease, why = read_lease(P, rid)
  if lease then
    release_lease(P, lease)
    refund_tpm(P, lease, tokens)
    local tags = lease_tags(lease.k, lease.x)
    add_spend(P, tags, tokens, cost, W, false)
    add_usage(P, now, clock_ms, W.usage, lease.k, u_model, u_endpoint, u_user,
      {1, u_in, u_cached, u_out, cost})
    local events = check_budgets(P, tags, W, now, now_iso, rid)
    append_usage_args(P, RECORD_AT, A)
    return events
  end

  if why == 'malformed' then
    -- Its reservation cannot be released (its numbers are unreadable), but the usage is known:
    -- charge it, and set the record aside for an operator.
    set_aside(P, rid, now, 'malformed at settle')
    local tags = lease_tags(kid, '')
    add_spend(P, tags, tokens, cost, W, false)
    add_usage(P, now, clock_ms, W.usage, kid, u_model, u_endpoint, u_user,
      {1, u_in, u_cached, u_out, cost})
    local events = check_budgets(P, tags, W, now, now_iso, rid)
    append_usage_args(P, RECORD_AT, A)
    return events
  end

  local marker = P .. K.reclaimed .. rid
  local m = redis.call('HMGET', marker, 'k', 'x', 'c', 't', 'daily', 'weekly', 'monthly')
  if not m[1] then
    -- Settled before (a replay), or never admitted: e.g. the release of an admit whose reply
    -- was lost, which may yet reach Redis; the tombstone keeps it from reserving then.
    redis.call('SET', P .. K.done .. rid, '1', 'EX', DONE_TTL)
    return -1
  end
  local um = redis.call('HMGET', marker, 'ua', 'pi', 'm', 'e', 'u1', 'u2', 'u3')
  redis.call('DEL', marker)
  local charged_c, charged_t = exact_int(m[3]) or 0, exact_int(m[4]) or 0
  local then_W = {win = {daily = m[5], weekly = m[6], monthly = m[7]}, ttl = W.ttl}
  local tags = lease_tags(m[1], m[2])
  add_spend(P, tags, tokens - charged_t, cost - charged_c, then_W, true)
  local charged_at, charged_pi = exact_int(um[1]), exact_int(um[2])
  if charged_at and charged_pi then
    add_usage(P, charged_at, clock_ms, W.usage, m[1], um[3] or '', um[4] or '', '',
      {0, u_in - charged_pi, u_cached, u_out - (charged_t - charged_pi), cost - charged_c},
      {um[5] or '', um[6] or '', um[7] or ''})
  end
  local events = 0
  if cost > charged_c or tokens > charged_t then
    events = check_budgets(P, tags, then_W, now, now_iso, rid)
  end
  local record = {unpack(A, RECORD_AT)}
  record[#record + 1] = 'late'
  record[#record + 1] = '1'
  append_usage(P, record)
  return events
end
