"""Side-by-side load test of the forwarding hot path; run with `python -m bench`."""
