"""Ioffe & Szegedy (2015)'s experiments with tritonbn: see examples/README.md."""
