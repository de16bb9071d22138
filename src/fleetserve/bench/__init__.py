"""Benchmarks of fleetserve: the in-process engine benchmark lives in ``engine_bench``."""
