-- tether bench: SendMessage under wrk.
-- Every request carries a unique messageId (the server de-duplicates by it):
-- <nonce>-<thread>-<counter>, built in request() with a per-thread counter.
-- response() counts answers that hold TASK_STATE_COMPLETED; done() prints one
-- JSON line, prefixed with TETHER_BENCH, that the bench parses.
-- wrk -s send.lua URL -- <nonce> [blocking|immediate]

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  nonce = args[1] or "wrk"
  immediate = args[2] == "immediate"
  counter = 0
  completed = 0
  bad = 0
  if immediate then
    expect = '"result"'
    config = ',"configuration":{"returnImmediately":true}'
  else
    expect = "TASK_STATE_COMPLETED"
    config = ""
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"jsonrpc":"2.0","id":%d,"method":"SendMessage","params":{"message":'
      .. '{"messageId":"%s-%d-%d","role":"ROLE_USER","parts":[{"text":"hello %d"}]}%s}}',
    counter, nonce, tid, counter, counter, config)
  return wrk.format(nil, "/", nil, body)
end

function response(status, headers, body)
  if status == 200 and string.find(body, expect, 1, true) then
    completed = completed + 1
  else
    bad = bad + 1
    if bad <= 3 then
      io.stderr:write("TETHER_BENCH_BAD " .. status .. " " .. string.sub(body, 1, 300) .. "\n")
    end
  end
end

function done(summary, latency, requests)
  local c, b = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("completed")
    b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'TETHER_BENCH {"completed":%d,"not_completed":%d,"requests":%d,"duration_us":%d,'
      .. '"bytes":%d,"socket_errors":{"connect":%d,"read":%d,"write":%d,"status":%d,'
      .. '"timeout":%d},"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,'
      .. '"p95":%d,"p99":%d,"p999":%d}}\n',
    c, b, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9)))
end
