"""The notification API's domain: categories, templates, requests, keys, campaigns.

Plain functions and small classes (no I/O); `ports.py` names what they need from the world,
which `operators/adapters/` implements (Redis, Kafka, the stores) and `fanfare api` wires.
"""
