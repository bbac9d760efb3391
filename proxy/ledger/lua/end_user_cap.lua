-- The cap on distinct end users an org may name in a calendar month ([limits]
-- max_end_users_per_month). X-On-Behalf-Of is chosen by the client and every new id costs the
-- store something (usage-counter rows everywhere; spend windows, in-flight and rate-limit
-- levels where the org tracks its end users), so one key could otherwise grow Redis without
-- bound. Ids already seen this month pass; a new one past the cap is refused before anything
-- is written. Members are the first 16 hex digits of the SHA-1 of the id's tag: 16 bytes an id
-- whatever its length (a false "seen" needs a 64-bit collision).

-- Returns the month's set and the member to add once the request is admitted (nil when the
-- id was seen already, or no id or cap applies), or false when a new id does not fit.
local function end_user_seen(P, W, user_tag, cap)
  if user_tag == '' or cap <= 0 then
    return true, nil
  end
  local seen = P .. K.users_seen .. W.win.monthly
  local member = string.sub(redis.sha1hex(user_tag), 1, 16)
  if redis.call('SISMEMBER', seen, member) == 1 then
    return seen, nil
  end
  if redis.call('SCARD', seen) >= cap then
    return false, nil
  end
  return seen, member
end

local function note_end_user(seen, member, W)
  if member then -- (seen is the set's name whenever member is set)
    redis.call('SADD', seen, member)
    redis.call('EXPIRE', seen, W.ttl.monthly)
  end
end
