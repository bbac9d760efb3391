-- hash_swap: compare-and-set of one hash field. Used to rewrite a stored value (e.g. seal a
-- webhook secret kept in plain text) without losing a write made meanwhile by another process.
--
-- KEYS[1]  the hash
-- ARGV     field, expected current value, new value
-- Returns  1 when swapped, 0 when the field held something else (or nothing)

if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
