-- Budget fields: which budgets judge which scope's spend.
-- The org's fields of the common case (no end user) are the prelude's ORG_FIELD1, ORG_FIELD2.

-- End users. An end user named by X-On-Behalf-Of counts as the tag TAG.user .. <hex of the
-- id's UTF-8 bytes> (nothing in it can break a key name, a field or the org's hash tag); their
-- budgets are the fields <tag>:<owner> (explicit) and TAG.user_default:<owner> (the org's
-- default for each end user): proxy/ledger/keys.py. Only a lease whose org budgets or limits
-- its end users carries the tag (see admit.lua).
local USER_DEFAULT_FIELD = '^' .. TAG.user_default .. ':(%a+)$'
local USER_DEFAULT_HEAD = TAG.user_default .. ':'

local function is_user_tag(tag)
  return string.sub(tag, 1, #TAG.user) == TAG.user
end

local function end_user_id(tag)
  return (string.gsub(string.sub(tag, #TAG.user + 1), '%x%x', function(h)
    return string.char(tonumber(h, 16))
  end))
end

-- The budget fields over these scope tags, each with the tag whose spend it judges: both owners
-- of every tag, and for an end user also the org's default for each end user.
local function budget_fields(tags)
  local fields, field_tags = {}, {}
  for _, tag in ipairs(tags) do
    for _, owner in ipairs(OWNERS) do
      fields[#fields + 1] = tag .. ':' .. owner
      field_tags[#field_tags + 1] = tag
    end
    if is_user_tag(tag) then
      for _, owner in ipairs(OWNERS) do
        fields[#fields + 1] = USER_DEFAULT_HEAD .. owner
        field_tags[#field_tags + 1] = tag
      end
    end
  end
  return fields, field_tags
end

-- An explicit end-user budget replaces the default of the same owner and period for that end
-- user (a default of another period still applies): such defaults' rules become false.
local function drop_replaced_defaults(fields, field_tags, rules)
  local at = {}
  for i = 1, #fields do
    at[fields[i]] = i
  end
  for i = 1, #fields do
    local owner = string.match(fields[i], USER_DEFAULT_FIELD)
    if owner and rules[i] then
      local e = at[field_tags[i] .. ':' .. owner]
      if e and rules[e] and string.match(rules[e], '^%S+') == string.match(rules[i], '^%S+') then
        rules[i] = false
      end
    end
  end
end

-- Where an end-user budget's events go: an explicit budget's to the end user's own list, the
-- default's to the default's list, remembered per end user; both name the end user.
local function event_target(field, tag)
  if string.sub(field, 1, #USER_DEFAULT_HEAD) == USER_DEFAULT_HEAD then
    return {id = end_user_id(tag), list = TAG.user_default, each = true}
  end
  if is_user_tag(tag) then
    return {id = end_user_id(tag), list = tag}
  end
  return nil
end
