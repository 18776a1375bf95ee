"""The servers people write by hand instead of using a serving framework (see lock_server.py)."""
