"""Using a trained model: generation with the key/value cache and sampling (generate.py), the log-probabilities of
given tokens (logprobs.py), and the OpenAI-style HTTP server that serve.py runs (server.py)."""
