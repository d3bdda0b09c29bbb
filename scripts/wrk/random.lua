-- GET /users/{id} with ids drawn uniformly from 1..IDS (env, default 1000000).
local ids = tonumber(os.getenv("IDS") or "1000000")
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  return wrk.format("GET", "/users/" .. math.random(1, ids))
end
