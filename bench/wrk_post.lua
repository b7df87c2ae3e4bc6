-- POSTs one JSON body over and over; counts 201 answers apart from every
-- other status, and prints one machine-readable line when done.
--   BENCH_BODY (env) overrides the body.
--   BENCH_TOKEN (env), if not empty, is sent as a bearer token.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"command":["true"]}'
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  created = 0
  other = 0
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"created_201":%d,' ..
    '"other_status":%d,"non_2xx_3xx":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"latency_p50_us":%d,"latency_p90_us":%d,' ..
    '"latency_p99_us":%d,"latency_max_us":%d,"latency_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, c, o, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
