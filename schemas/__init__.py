"""Event contracts: JSON Schema files for every topic, typed frozen records and their codecs."""
