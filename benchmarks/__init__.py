"""The demo and the benchmarks: real Redis, real workers, the real all-MiniLM-L6-v2."""
