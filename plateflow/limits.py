"""Limits set once and read by the configuration models and the command line (which imports
this, not pydantic, so its --help stays fast)."""

MAX_MEGAPIXELS = 250.0  # a larger image fails its plate (refresh) or is skipped (ingest), never exhausts memory
