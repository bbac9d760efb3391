-- key_index: changes to one entry of the global digest index ("bp:kd:<sha256>"), which is
-- how a bearer token finds its key, org, role and models. It lives in its own hash slot, so
-- it is changed after the key's record (key_record.lua), never in the same atomic step; each
-- change here only touches an entry that still belongs to the key, so no interleaving of a
-- PATCH and a DELETE can recreate a half entry (one without "kid" or "org").
--
-- KEYS[1]  "bp:kd:<sha256>"
-- ARGV     op, kid, then by op:
--   update  role, models, version, exp ("" for none) -> 1 when written; 0 when the entry is
--           gone (revoked) or already holds this or a newer version
--   drop    -> 1 when deleted; 0 when it is gone or belongs to another key
--   grace   until, delete_at -> 1: a rotated-out secret works until "until" (unix seconds),
--           and its entry is deleted by Redis at delete_at; 0 when it belongs to another key

local entry = KEYS[1]
local op, kid = ARGV[1], ARGV[2]
local f = redis.call('HMGET', entry, 'kid', 'v')
if f[1] ~= kid then
  return 0
end

if op == 'update' then
  if (tonumber(f[2]) or 0) >= tonumber(ARGV[5]) then
    return 0
  end
  redis.call('HSET', entry, 'role', ARGV[3], 'models', ARGV[4], 'v', ARGV[5])
  if (ARGV[6] or '') == '' then
    redis.call('HDEL', entry, 'exp')
  else
    redis.call('HSET', entry, 'exp', ARGV[6])
  end
  return 1
end

if op == 'grace' then
  redis.call('HSET', entry, 'until', ARGV[3])
  redis.call('EXPIREAT', entry, ARGV[4])
  return 1
end

if op == 'drop' then
  redis.call('DEL', entry)
  return 1
end

return redis.error_reply('key_index: unknown op ' .. tostring(op))
