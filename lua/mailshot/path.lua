-- mailshot.path: the files a campaign names, relative to a folder given explicitly.
--
-- No module keeps a "current folder": a campaign resolves its files against its base_dir,
-- template.file against opts.base_dir, mime.build against the message's base_dir (nil: the
-- current directory).  `mailshot run` hands a campaign script a mailshot module that passes the
-- script's folder (see cli.lua, load_campaign).

local sub = string.sub

local M = {}

--- resolve(path, base) -> path, or base/path when path is relative and base is not nil or "".
function M.resolve(path, base)
  if base and base ~= "" and sub(path, 1, 1) ~= "/" then
    return (sub(base, -1) == "/" and base or base .. "/") .. path
  end
  return path
end

--- read(path, base, what) -> contents, full path | nil, "what <full path>: <reason>"
function M.read(path, base, what)
  local full = M.resolve(path, base)
  local f, err = io.open(full, "rb")
  local data
  if f then
    data, err = f:read("a")
    f:close()
  end
  if not data then
    -- io.open says "<path>: <reason>"; keep only the reason
    local reason = tostring(err)
    if sub(reason, 1, #full + 2) == full .. ": " then reason = sub(reason, #full + 3) end
    return nil, what .. " " .. full .. ": " .. reason
  end
  return data, full
end

return M
