-- wrk script for bench/run.sh: the same small, realistic chat request through every system,
-- and a machine-readable summary line (latencies in microseconds). BENCH_STREAM=1 makes it a
-- stream request ("stream": true), the body otherwise the same.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "sk-bench-client-token")
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
local stream = os.getenv("BENCH_STREAM") == "1"
wrk.body = '{"model":"gpt-4o-mini","temperature":0.7,"max_tokens":256,'
  .. (stream and '"stream":true,' or '')
  .. '"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},'
  .. '{"role":"user","content":"What is the capital of France, and what is it known for? Please answer in two sentences."}]}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d duration_us=%d p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f mean_us=%.1f "
      .. "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
