-- Shared by every case: numbers each thread (the global `id`, from 0) and, when wrk is done, prints one
-- JSON line that bench/load.py reads. Latencies are in microseconds; `status_errors` counts answers with
-- a status of 400 or more; `exhausted` counts requests a token list had no fresh token for.
threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local exhausted = 0
  for _, thread in ipairs(threads) do
    exhausted = exhausted + (thread:get("exhausted") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"exhausted":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, errors.status, errors.connect, errors.read, errors.write, errors.timeout, exhausted))
end
