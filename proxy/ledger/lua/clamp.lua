-- Clamping: a request whose worst case does not fit some budgets (squeezed) gets its output
-- cap per choice lowered within [lowest, cap) to the most that fits every one of them. The
-- caller guarantees that the reservation is prompt + cap * choices tokens costing
-- cost(cap * choices). terms: "choices cap lowest A_q A_r R_q R_r", the cost function being
-- cost(output) = ceil((A + output * R) / 1e6) with A and R divided by 1e6 with remainder
-- (proxy/ledger/admission.py: ClampTerms). Read only when a budget is squeezed.
--
-- Returns a refusal, or nil and the cap, the tokens and the cost reserved with it.
local function clamp_cap(terms_arg, prompt_tokens, squeezed, fields, rt, rc)
  local terms = {}
  for part in string.gmatch(terms_arg, '%S+') do
    terms[#terms + 1] = exact_int(part)
  end
  local choices, cap_max, cap_min, a_q, a_r, r_q, r_r = unpack(terms)
  for j = 1, 7 do
    if not terms[j] or terms[j] < 0 then
      return {'invalid', 'clamp_terms'}
    end
  end
  if choices < 1 or cap_min < 1 or cap_min >= cap_max then
    return {'invalid', 'clamp_terms'}
  end
  local function cost_of(cap)
    -- ceil((A + o * R) / 1e6) in parts that each stay exact in a double
    local o = cap * choices
    local o_q = math.floor(o / 1000000)
    local o_r = o - o_q * 1000000
    local x = a_r + o_r * r_r
    local up = math.floor(x / 1000000)
    if up * 1000000 < x then
      up = up + 1
    end
    return a_q + o * r_q + o_q * r_r + up
  end
  local function misfit(cap)
    local t, c = prompt_tokens + cap * choices, cost_of(cap)
    for _, b in ipairs(squeezed) do
      if b.used + in_unit(b.unit, t, c) > b.floor then
        return b
      end
    end
    return nil
  end
  local b = misfit(cap_min)
  if b then
    return budget_refusal(fields, b, 'exceeds', in_unit(b.unit, rt, rc))
  end
  local lo, hi = cap_min, cap_max - 1
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if misfit(mid) then
      hi = mid - 1
    else
      lo = mid
    end
  end
  return nil, lo, prompt_tokens + lo * choices, cost_of(lo)
end
