-- Rate limits: a GCRA (leaky bucket) per limit, all of one scope in one small hash
-- (K.rl .. <tag>): the level of each bucket and when the levels were last drained ('at').
-- A limit of N per window T admits N back to back, then drains at N/T: one more every T/N.
-- Tokens per minute reserve the request's worst case; settle returns the unused part.
-- Concurrency is the in-flight count of the scope's live leases (leases.lua).
--
-- A scope is {name, tag, limits (rps, rpm, rph, rpd, tpm, concurrency), lease letter}.

local LIMIT_NAMES = {'rps', 'rpm', 'rph', 'rpd', 'tpm', 'concurrency'}
local WINDOW_MS = {1000, 60000, 3600000, 86400000, 60000}
local EPSILON = 1e-9 -- drained levels are fractions: 0.99999999999 of a request is one request

local function tpm_figures(R, limit, after)
  local remaining = math.floor(limit - after + EPSILON)
  if R.tok_limit < 0 or remaining < R.tok_remaining then
    R.tok_limit, R.tok_remaining = limit, remaining
    R.tok_reset = math.ceil(after * WINDOW_MS[5] / limit - EPSILON)
  end
end

-- Judges every limit of every scope for a request of rt tokens. Returns a refusal, or nil and
-- R: the writes that reserve (made by write_rates once everything passed) and the figures
-- for the response headers. With clampable, the tokens-per-minute levels are kept so that
-- relevel_tpm can set them again for a lowered reservation.
local function check_rates(P, scopes, now, rt, clampable)
  local R = {writes = {}, tpm_slots = {}, req_limit = -1, req_remaining = -1, req_reset = -1,
    tok_limit = -1, tok_remaining = -1, tok_reset = -1}
  for _, scope in ipairs(scopes) do
    local limits = scope[3]
    if limits[1] or limits[2] or limits[3] or limits[4] or limits[5] then
      local h = P .. K.rl .. scope[2]
      local v = redis.call('HMGET', h, 'at', 'rps', 'rpm', 'rph', 'rpd', 'tpm')
      local at = exact_int(v[1]) or now
      local elapsed = math.max(now - at, 0)
      local write = {h, 'at', I(math.max(at, now))}
      local ttl = 0
      for i = 1, 5 do
        local limit = limits[i]
        if limit then
          local window = WINDOW_MS[i]
          local stored = tonumber(v[i + 1]) or 0
          if stored ~= stored or stored == math.huge or stored == -math.huge then
            stored = 0 -- a level no script wrote: start the bucket afresh rather than fail
          end
          local level = math.max(stored - elapsed * limit / window, 0)
          local cost = 1
          if i == 5 then
            cost = rt
          end
          local after = level + cost
          if after > limit + EPSILON then
            local retry = -1
            if cost <= limit then
              -- In milliseconds, without the rounding of the drained fraction.
              retry = math.ceil((stored + cost - limit) * window / limit - elapsed - EPSILON)
            end
            return {'rate', scope[1], LIMIT_NAMES[i], limit, retry, math.ceil(level - EPSILON)}
          end
          if i == 5 then
            tpm_figures(R, limit, after)
          else
            local remaining = math.floor(limit - after + EPSILON)
            if R.req_limit < 0 or remaining < R.req_remaining then
              R.req_limit, R.req_remaining = limit, remaining
              R.req_reset = math.ceil(after * window / limit - EPSILON)
            end
          end
          write[#write + 1] = LIMIT_NAMES[i]
          write[#write + 1] = string.format('%.17g', after)
          if i == 5 and clampable then
            R.tpm_slots[#R.tpm_slots + 1] = {write = write, at = #write, level = level,
              limit = limit}
          end
          ttl = math.max(ttl, window)
        elseif v[i + 1] then
          redis.call('HDEL', h, LIMIT_NAMES[i]) -- a removed limit leaves no stale level behind
        end
      end
      write[#write + 1] = ttl
      R.writes[#R.writes + 1] = write
    end
  end
  return nil, R
end

-- The tokens-per-minute levels (and header figures) for a reservation lowered to rt tokens.
local function relevel_tpm(R, rt)
  if #R.tpm_slots == 0 then
    return
  end
  R.tok_limit, R.tok_remaining, R.tok_reset = -1, -1, -1
  for _, slot in ipairs(R.tpm_slots) do
    slot.write[slot.at] = string.format('%.17g', slot.level + rt)
    tpm_figures(R, slot.limit, slot.level + rt)
  end
end

local function write_rates(R)
  for _, wr in ipairs(R.writes) do
    local ttl = table.remove(wr)
    redis.call('HSET', unpack(wr))
    redis.call('PEXPIRE', wr[1], I(ttl + 1000))
  end
end

-- Concurrency: a refusal, or nil and the in-flight counters read, by tag (hold() reuses them).
local function check_concurrency(P, scopes)
  local inflight = {}
  for _, scope in ipairs(scopes) do
    inflight[scope[2]] = read_inflight(P, scope[2])
    local limit = scope[3][6]
    local n = inflight[scope[2]].n
    if limit and n >= limit then
      return {'rate', scope[1], 'concurrency', limit, -1, n}
    end
  end
  return nil, inflight
end
