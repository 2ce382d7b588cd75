"""Loopback simulators of DingTalk and Dify, used by the tests, the demo and the benchmarks."""
