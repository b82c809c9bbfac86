"""Workloads, load generation, simulation and measurements for mars-serve."""
