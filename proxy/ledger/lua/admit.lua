-- admit: one round trip decides everything about one request, atomically.
-- Checks key status, rate limits (key, org, end user), concurrency, tokens per minute and
-- every budget that applies; only when all pass does it reserve (a lease). Nothing is written
-- on rejection except housekeeping (reclaiming dead proxies' leases, dropping a removed
-- limit's level). Idempotent by request id: admitting a request that already holds a lease (a
-- call retried after a lost reply or a failover) reserves nothing more.
--
-- KEYS, ARGV  see AdmitArgs in proxy/ledger/args.py (the only place that builds them)
-- Returns  {"ok", req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--           tok_reset_ms, budget_remaining, budget_line, budget_unit, budget_window, budget_field,
--           clamped cap per choice, reserved tokens, reserved cost ("" each when not clamped)}
--       or {"dup"} (already admitted) | {"revoked"} | {"need_user"} (the org requires
--          X-On-Behalf-Of) | {"users", cap} (a new end user past the month's cap)
--          | {"invalid", argument}
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
W.usage = ARGV[27]
local now_iso = ARGV[19]
local prompt_tokens = exact_int(ARGV[20])
local user = ARGV[24] or ''
local flags = ARGV[25] or ''
local clamp_terms = ARGV[26] or ''
local user_cap = exact_int(ARGV[28]) or 0
local bad = first_invalid({'now_ms', now, 'reserve_tokens', rt, 'reserve_cost_nano', rc,
  'lease_ms', lease_ms, 'prompt_tokens', prompt_tokens})
if bad then
  return {'invalid', bad}
end
if user ~= '' and not string.match(user, '^' .. TAG.user .. '%x+$') then
  return {'invalid', 'end_user'}
end
local dry = flags ~= '' and string.find(flags, 'd', 1, true) ~= nil
local clamp_asked = flags ~= '' and string.find(flags, 'c', 1, true) ~= nil
local clampable = clamp_terms ~= '' -- whether the output cap may be lowered (clamp.lua)

-- Already admitted (a retried call), or already settled: an admit that reaches Redis after
-- its request gave up on it (and released it) must not reserve again.
if redis.call('EXISTS', P .. K.lease .. rid, P .. K.done .. rid) > 0 then
  return {'dup'}
end

local ktag = TAG.key .. kid
local kf = redis.call('HMGET', P .. K.key .. kid, 'status', unpack(LIMIT_NAMES))
if kf[1] ~= 'active' then
  return {'revoked'}
end

reclaim_expired(P, now, W, now_iso, 32)

local key_limits = {}
for i = 1, 6 do -- the key's own, else its role's defaults
  key_limits[i] = exact_int(kf[i + 1]) or exact_int(ARGV[9 + i])
end
-- The org's policy hash: its own limits, then its end-user policy (proxy/ledger/end_users.py):
-- whether requests must name an end user, and whether the org has ever had an end-user
-- budget or policy (u_on). Only then does a named end user cost anything more to check.
local of = redis.call('HMGET', P .. K.limits, 'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency',
  'u_required', 'u_on')
if user == '' and of[7] == '1' then
  return {'need_user'}
end
local seen, new_user = end_user_seen(P, W, user, user_cap)
if not seen then
  return {'users', user_cap}
end
if of[8] ~= '1' then
  user = '' -- the org has no rule for its end users: nothing to check or keep for them
end
local org_limits = {}
for i = 1, 6 do
  org_limits[i] = exact_int(of[i])
end

-- Budgets that may apply: the key's, the org's and, for a named end user, theirs and the
-- org's default for each end user (budget_fields.lua).
local fields, tags
if user == '' then
  fields = {ktag .. OWN1, ktag .. OWN2, ORG_FIELD1, ORG_FIELD2}
  tags = {ktag, ktag, TAG.org, TAG.org}
else
  fields, tags = budget_fields({ktag, TAG.org, user})
end
local rules = redis.call('HMGET', P .. K.budget_rules, unpack(fields))

local scopes, tracked = admission_scopes(P, ktag, key_limits, org_limits, user, rules)

local refused, R = check_rates(P, scopes, now, rt, clampable)
if refused then
  return refused
end
local inflight
refused, inflight = check_concurrency(P, scopes)
if refused then
  return refused
end
if tracked then
  drop_replaced_defaults(fields, tags, rules)
end
local J
refused, J = judge_budgets(P, fields, tags, rules, W.win, inflight, rt, rc, clampable,
  clamp_asked)
if refused then
  return refused
end

local clamped, reserved_t, reserved_c = '', '', ''
if #J.squeezed > 0 then
  refused, clamped, rt, rc = clamp_cap(clamp_terms, prompt_tokens, J.squeezed, fields, rt, rc)
  if refused then
    return refused
  end
  reserved_t, reserved_c = I(rt), I(rc)
  relevel_tpm(R, rt)
  retighten(J, fields, rt, rc)
end

local reply = {'ok', R.req_limit, R.req_remaining, R.req_reset, R.tok_limit, R.tok_remaining,
  R.tok_reset, I_or_empty(J.remaining), I_or_empty(J.line), J.unit, J.window, J.field, clamped,
  reserved_t, reserved_c}
if dry then
  return reply
end

-- Everything passed: reserve.
note_end_user(seen, new_user, W)
write_rates(R)
local tpm_scopes, extra = '', ''
for _, scope in ipairs(scopes) do
  if scope[3][5] then
    tpm_scopes = tpm_scopes .. scope[4]
  end
end
if tracked then
  extra = user
end
hold(P, lease_tags(kid, extra), rc, rt, inflight)
redis.call('HSET', P .. K.lease .. rid, 'k', kid, 'c', I(rc), 't', I(rt), 'r', tpm_scopes,
  'pi', I(prompt_tokens), 'm', ARGV[21] or '', 'e', ARGV[22] or '', 'u', ARGV[23] or '',
  'x', extra)
redis.call('ZADD', P .. K.leases, I(now + lease_ms), rid)
return reply
