-- Numbers. Lua numbers are doubles and Redis parses what a script passes as text: tostring()
-- writes 1e+17 for 10^17 and "-0" for a negated zero, and HINCRBY rejects both; a script error
-- keeps the writes made before it. So every integer a command receives goes through I(), every
-- integer read comes through exact_int(), and the request path never lets a number past
-- 2^53 - 1 (the largest a double holds exactly) reach a script.

local MAX_EXACT = 9007199254740991

local function I(n)
  if n == 0 then
    return '0'
  end
  return string.format('%.0f', n)
end

local function exact_int(v)
  local n = tonumber(v)
  if n == nil or n ~= n or n ~= math.floor(n) or n > MAX_EXACT or n < -MAX_EXACT then
    return nil
  end
  return n
end

local function I_or_empty(x)
  if x == '' then
    return ''
  end
  return I(x)
end

-- The name of the first of {name, value, ...} whose value is not a non-negative exact integer
-- (nil when all are).
local function first_invalid(named)
  for i = 2, #named, 2 do
    if not named[i] or named[i] < 0 then
      return named[i - 1]
    end
  end
  return nil
end
