-- key_record: changes to one API key's record, each one atomic in the key's org slot.
-- The record is what the admit script reads (status, limits); the global digest index
-- (key_index.lua) is updated after it, from what this script returns.
--
-- KEYS[1]  the record, "bp:{o:<org>}:key:<kid>"
-- ARGV     op, then by op:
--   update  n, then n field/value pairs to set, then the fields to delete
--           -> {digest, role, models, version, exp} after the change, or false when the
--              key is not active (revoked meanwhile: nothing is changed)
--   revoke  -> the digest, or false when there is no such record
--   rotate  new digest, new prefix, now -> {old digest, role, models, version, exp}, or
--           false when the key is not active; the record (limits, budgets, spend: all keyed
--           by the key id) stays, only the secret's digest changes
-- Every update bumps the record's version "v", so the index keeps the newest state only,
-- whatever order concurrent index writes arrive in.

local rec = KEYS[1]
local op = ARGV[1]

if op == 'update' then
  if redis.call('HGET', rec, 'status') ~= 'active' then
    return false
  end
  local n = tonumber(ARGV[2])
  if n > 0 then
    local pairs_ = {}
    for i = 3, 2 + 2 * n do
      pairs_[#pairs_ + 1] = ARGV[i]
    end
    redis.call('HSET', rec, unpack(pairs_))
  end
  if #ARGV > 2 + 2 * n then
    redis.call('HDEL', rec, unpack(ARGV, 3 + 2 * n))
  end
  local version = redis.call('HINCRBY', rec, 'v', 1)
  local f = redis.call('HMGET', rec, 'digest', 'role', 'models', 'exp')
  return {f[1] or '', f[2] or '', f[3] or '', version, f[4] or ''}
end

if op == 'rotate' then
  if redis.call('HGET', rec, 'status') ~= 'active' then
    return false
  end
  local f = redis.call('HMGET', rec, 'digest', 'role', 'models', 'exp')
  redis.call('HSET', rec, 'digest', ARGV[2], 'prefix', ARGV[3], 'rotated_at', ARGV[4])
  local version = redis.call('HINCRBY', rec, 'v', 1)
  return {f[1] or '', f[2] or '', f[3] or '', version, f[4] or ''}
end


if op == 'revoke' then
  if redis.call('EXISTS', rec) == 0 then
    return false
  end
  redis.call('HSET', rec, 'status', 'revoked')
  return redis.call('HGET', rec, 'digest') or ''
end

return redis.error_reply('key_record: unknown op ' .. tostring(op))
