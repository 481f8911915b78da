//! Benchmark harness (arrives with issue 7).
