-- The scopes one admission counts against, each {name, tag, limits (rps, rpm, rph, rpd, tpm,
-- concurrency), lease letter}: the key, the org and, where the org asks for it, the end user.

-- An end user counts as a scope of its own (in-flight, spend windows, rate limits) only where
-- the org asks for it: a budget or limit that applies to them (rules: of the budget fields
-- from budget_fields(), theirs from the fifth on), or u_track. Everyone else's requests cost
-- nothing more than without the header. Returns the scopes and whether the end user is one.
local function admission_scopes(P, ktag, key_limits, org_limits, user, rules)
  local tracked = false
  local user_limits = {}
  if user ~= '' then
    local uf = redis.call('HMGET', P .. K.limits, 'u_track', 'u_rps', 'u_rpm', 'u_rph', 'u_rpd',
      'u_tpm', 'u_concurrency')
    tracked = uf[1] == '1'
    for i = 1, 6 do
      user_limits[i] = exact_int(uf[1 + i])
      tracked = tracked or user_limits[i] ~= nil
    end
    for i = 5, #rules do
      tracked = tracked or rules[i] ~= false
    end
  end
  local scopes = {{'key', ktag, key_limits, 'k'}, {'org', TAG.org, org_limits, 'o'}}
  if tracked then
    scopes[3] = {'end_user', user, user_limits, 'u'}
  end
  return scopes, tracked
end
