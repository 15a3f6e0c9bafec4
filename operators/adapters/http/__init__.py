"""`fanfare api`'s HTTP side: the ASGI app (FastAPI), its errors, body limit and metrics."""
