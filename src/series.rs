//! What every series of the gateway shares: its namespace and the latency buckets. A leaf, so
//! that the gateway's metrics (`metrics`) and the HTTP request metrics (`http_metrics`) both
//! read it without importing each other.

/// The namespace every series carries.
pub const NAMESPACE: &str = "openai_api_route";

/// Buckets (seconds) of every latency histogram: chat completions take 10–120 s and more, so
/// the buckets reach 300 s (version 0.2; see the observability guide, "Metrics") instead of
/// stopping at 10 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
