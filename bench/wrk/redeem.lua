-- Redeems a fresh token with every request: `wrk -s redeem.lua URL -- TOKENS PREFIX` sends
-- GET PREFIX..token, each thread taking its tokens, one a line, from the file TOKENS.<thread id>.
-- A thread that runs out sends "exhausted" instead (an unknown token) and counts it.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

function init(args)
  tokens, prefix, next_token, exhausted = {}, args[2], 0, 0
  for line in io.lines(args[1] .. "." .. id) do
    tokens[#tokens + 1] = line
  end
end

function request()
  next_token = next_token + 1
  local token = tokens[next_token]
  if token == nil then
    exhausted = exhausted + 1
    token = "exhausted"
  end
  return wrk.format(nil, prefix .. token)
end
