"""Benchmarks of training cost and inference latency."""
