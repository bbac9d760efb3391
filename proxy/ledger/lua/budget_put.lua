-- budget_put: create or replace one budget, keeping its id, and judge it at once against the
-- window's live spend: thresholds the new settings put behind current spend are recorded now
-- (and only once per window, like every crossing).
--
-- KEYS[1]  org prefix "bp:{o:<org>}:"
-- ARGV     field (proxy/ledger/keys.py: budget_field), budget
--          JSON with the id placeholder, candidate id, spend tag ("k:<kid>" | "o" | "u:<hex>";
--          "" for the default of each end user, which has no spend of its own and is judged
--          at each end user's next settle), window id, window ttl (s), now_ms, now_iso, seed,
--          rule (see budgets.rule), end user id (explicit end-user budgets: named in events)
-- Returns  the budget's id

local P = KEYS[1]
local field, json, candidate = ARGV[1], ARGV[2], ARGV[3]
local tag, w, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
local now_ms, now_iso, seed, rule = tonumber(ARGV[7]), ARGV[8], ARGV[9], ARGV[10]
local PLACEHOLDER = '"id":"__BUDGET_ID__"'

local ids = P .. K.budget_ids
redis.call('HSETNX', ids, field, candidate)
local id = redis.call('HGET', ids, field)

local s, e = string.find(json, PLACEHOLDER, 1, true)
local raw = string.sub(json, 1, s - 1) .. '"id":"' .. id .. '"' .. string.sub(json, e + 1)
redis.call('HSET', P .. K.budgets, field, raw)
redis.call('HSET', P .. K.budget_rules, field, rule)
if string.sub(field, 1, #TAG.user) == TAG.user or
    string.sub(field, 1, #TAG.user_default + 1) == TAG.user_default .. ':' then
  -- The org now budgets its end users: admissions look their budgets up from here on (the
  -- flag stays when they are deleted; the look-up then finds nothing).
  redis.call('HSET', P .. K.limits, 'u_on', '1')
end

if tag ~= '' then
  local target = nil
  if (ARGV[11] or '') ~= '' then
    target = {id = ARGV[11], list = tag}
  end
  record_crossings(P, cjson.decode(raw), raw, tag, w, ttl, now_ms, now_iso, seed, target)
end
return id
