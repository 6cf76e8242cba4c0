"""`dyvte-rt serve`: the continuous-batching engine, the OpenAI-compatible HTTP API, its metrics."""
