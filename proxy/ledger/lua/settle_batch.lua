-- settle_batch: many settles of one org in one call (proxy/ledger/settle_batches.py gathers
-- them). Each item is exactly settle.lua's settle (settle_one.lua), in order, so the books are
-- those of the same settles sent one by one; one call saves the per-call cost (a round trip,
-- EVALSHA's lookup and the script's set-up) for all but the first. Every item is idempotent by
-- its request id, so a batch retried after a lost reply settles each request once.
--
-- KEYS[1]  the org's prefix
-- ARGV     n, then n items: len, then that item's SettleArgs.argv() (proxy/ledger/args.py)
-- Returns  one entry per item: its settle's result (events recorded, or -1), or the error
--          message of an item refused (its numbers unreadable), which settles nothing.

local P = KEYS[1]
local n = exact_int(ARGV[1])
if not n or n < 1 then
  return redis.error_reply('settle_batch: bad item count')
end
-- Every item's extent is checked before anything is written: a malformed batch settles none.
local starts, pos = {}, 2
for i = 1, n do
  local len = exact_int(ARGV[pos])
  if not len or len < 20 or pos + len > #ARGV then
    return redis.error_reply('settle_batch: bad item ' .. i)
  end
  starts[i] = {pos + 1, pos + len}
  pos = pos + len + 1
end
if pos - 1 ~= #ARGV then
  return redis.error_reply('settle_batch: trailing arguments')
end

local out = {}
for i = 1, n do
  local result = settle_one(P, {unpack(ARGV, starts[i][1], starts[i][2])})
  if type(result) == 'table' then
    out[i] = result.err or 'settle_batch: unexpected result'
  else
    out[i] = result
  end
end
return out
