"""Simulated fleets, experiment configs and benchmark/reproduction scripts."""
