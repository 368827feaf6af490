-- Mints and keeps the tokens: `wrk -s collect.lua URL -- OUT FIELD` writes the string value of the JSON
-- field FIELD of every 200 answer to the file OUT.<thread id>, one a line.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

function init(args)
  out = assert(io.open(args[1] .. "." .. id, "w"))
  out:setvbuf("line")  -- a thread's Lua state is never closed: leave nothing in a buffer
  pattern = '"' .. args[2] .. '"%s*:%s*"([^"]+)"'
end

function response(status, headers, body)
  if status == 200 then
    local token = body:match(pattern)
    if token then
      out:write(token, "\n")
    end
  end
end
