"""The request path under the API: the segment loop with the exit switch, the KV cache, exit
policies, sampling, decoding and compute accounting."""
