"""fanfare's pure decisions (eligibility, quiet hours, sharding, dedupe, batching) and adapters."""
