"""The OpenAI-compatible HTTP front of the gateway (chat/completions with a session's memory).

It holds no sessions, keys or limits of its own: every request becomes calls to the gateway's gRPC API
with the caller's API key and deadline, so tenants, quotas, backpressure and statuses are the
gateway's, and a gRPC status becomes an HTTP status in one table (`errors.py`).
"""
