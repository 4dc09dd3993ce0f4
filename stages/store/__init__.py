"""The content-addressed store: local entries, the remote mirror, recipe views, digests. Imports nothing above it."""
