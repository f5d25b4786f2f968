"""Companions of the worker: a simulated fleet, an event tail, a local Kafka broker."""
