-- GET /users/{id} with ids drawn from a Zipf distribution over 1..IDS (env,
-- default 1000000) with exponent ZIPF_S (env, default 1.1): id 1 is the
-- most read. The sampler is Go's math/rand Zipf (rejection-inversion,
-- Hörmann and Derflinger) with v = 1, as `userapi bench --workload zipf`
-- draws its ids.
local ids = tonumber(os.getenv("IDS") or "1000000")
local q = tonumber(os.getenv("ZIPF_S") or "1.1")
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))

local v, imax = 1.0, ids - 1
local oneminusq = 1.0 - q
local oneminusqinv = 1.0 / oneminusq
local exp, log, floor, random = math.exp, math.log, math.floor, math.random
local function h(x) return exp(oneminusq * log(v + x)) * oneminusqinv end
local function hinv(x) return exp(oneminusqinv * log(oneminusq * x)) - v end
local hxm = h(imax + 0.5)
local hx0minushxm = h(0.5) - exp(log(v) * -q) - hxm
local s = 1 - hinv(h(1.5) - exp(-q * log(v + 1.0)))

local function zipf()
  while true do
    local ur = hxm + random() * hx0minushxm
    local x = hinv(ur)
    local k = floor(x + 0.5)
    if k - x <= s or ur >= h(k + 0.5) - exp(-log(k + v) * q) then
      return k
    end
  end
end

request = function()
  return wrk.format("GET", "/users/" .. (zipf() + 1))
end
