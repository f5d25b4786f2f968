"""Kafka for the worker and the tools: typed protocols, settings, and the kafka-python client."""
