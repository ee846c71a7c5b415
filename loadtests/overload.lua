-- wrk script for loadtests/overload.py (make overload): every request POSTs the next real clip
-- (16-bit WAV, as ESC-50 ships them) to /v1/classify, rotating through the files listed one per
-- line in the file named after `--`:
--   wrk -t2 -c32 -d20s --timeout 30s -s loadtests/overload.lua http://127.0.0.1:8000 -- clips.txt
-- At the end it prints one line, "OVERLOAD_JSON {...}": answers by status, socket errors, and
-- the latency percentiles of every answer (wrk cannot tell accepted from refused latencies;
-- overload.py takes those from HAProxy's log).

local bodies = {}  -- this thread's copy of the clips (each wrk thread has its own Lua state)
local next_clip = 1
statuses = {}  -- global: done() reads it from every thread with thread:get

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)  -- threads start at different clips
  table.insert(threads, thread)
end

function init(args)
  local list = assert(args[1], "usage: wrk ... -s overload.lua URL -- CLIP_LIST_FILE")
  for path in io.lines(list) do
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  assert(#bodies > 0, "no clips in " .. list)
  next_clip = ((id or 1) - 1) % #bodies + 1
end

function request()
  local body = bodies[next_clip]
  next_clip = next_clip % #bodies + 1
  return wrk.format("POST", "/v1/classify", { ["Content-Type"] = "audio/wav" }, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local by_status = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      by_status[status] = (by_status[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(by_status) do
    parts[#parts + 1] = string.format('"%d": %d', status, n)
  end
  local e = summary.errors
  print(string.format(
    'OVERLOAD_JSON {"duration_s": %.3f, "requests": %d, "bytes": %d, "statuses": {%s}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, '
      .. '"latency_ms": {"p50": %.1f, "p90": %.1f, "p99": %.1f, "max": %.1f}}',
    summary.duration / 1e6, summary.requests, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3
  ))
end
