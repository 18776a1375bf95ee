"""Benchmarks of modelfleet against in-process calls and peer servers: `python -m bench` (see __main__)."""
