-- Budgets at admission: the key's, the org's and the end user's (explicit, else the org's
-- default for each end user), owners cluster and org. A budget's rule (budget_rules, see
-- proxy/ledger/budgets.py: rule) is "<period> <unit> <block floor> <block ceil> <lowest line>
-- [clamp]". Blocked once settled spend reaches the block line; a request is refused when its
-- worst case would carry spend past the line, unless it may be clamped (clamp.lua): then its
-- output cap is lowered to the most that fits every such budget.

local function in_unit(unit, tokens, cost)
  if unit == 'c' then
    return cost
  end
  return tokens
end

local function budget_refusal(fields, b, why, r)
  return {'budget', fields[b.i], why, b.w, b.used, b.floor, I(r), b.unit}
end

-- The budget with the smallest share of its line left names the response's x-budget-* figures.
local function tighter(J, field, unit, floor, w, remaining)
  local share = remaining / math.max(floor, 1)
  if J.tightest == nil or share < J.tightest then
    J.tightest = share
    J.remaining, J.line, J.unit, J.window, J.field = remaining, floor, unit, w, field
  end
end

-- Judges a reservation of rt tokens costing rc against every budget in fields (rules: their
-- rules, tags: the scope each judges). Returns a refusal, or nil and J: the tightest budget's
-- figures, the budgets the worst case does not fit but a lower cap might (squeezed) and,
-- where the cap may be lowered, every applicable budget (the tightest is redone then).
local function judge_budgets(P, fields, tags, rules, win, inflight, rt, rc, clampable, asked)
  local J = {remaining = '', line = '', unit = '', window = '', field = '', squeezed = {},
    applicable = {}}
  for i = 1, #fields do
    local rule = rules[i]
    if rule then
      local period, unit, floor, ceil = string.match(rule, '^(%S+) (%S+) (%S+) (%S+)')
      floor, ceil = exact_int(floor), exact_int(ceil)
      local w = win[period]
      if floor and ceil and w and (unit == 'c' or unit == 't') then
        local spent = exact_int(redis.call('HGET', P .. K.spend .. tags[i] .. ':' .. w, unit))
          or 0
        local held = inflight[tags[i]][unit]
        local r = in_unit(unit, rt, rc)
        if spent >= ceil then
          local b = {i = i, unit = unit, floor = floor, w = w, used = spent}
          return budget_refusal(fields, b, 'blocked', r)
        end
        local used = spent + held
        if used + r > floor then
          local b = {i = i, unit = unit, floor = floor, w = w, used = used}
          if not (clampable and (asked or string.find(rule, ' clamp$'))) then
            return budget_refusal(fields, b, 'exceeds', r)
          end
          J.squeezed[#J.squeezed + 1] = b
          J.applicable[#J.applicable + 1] = b
        else
          tighter(J, fields[i], unit, floor, w, floor - used - r)
          if clampable then
            J.applicable[#J.applicable + 1] = {i = i, unit = unit, floor = floor, w = w,
              used = used}
          end
        end
      end
    end
  end
  return nil, J
end

-- After clamping: the tightest budget for the lowered reservation.
local function retighten(J, fields, rt, rc)
  J.tightest = nil
  for _, a in ipairs(J.applicable) do
    tighter(J, fields[a.i], a.unit, a.floor, a.w, a.floor - a.used - in_unit(a.unit, rt, rc))
  end
end
