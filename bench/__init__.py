"""Microbenchmarks of tritonbn against PyTorch eager and torch.compile.

Run ``python -m bench`` from the repository root (``--help`` for options).
Nothing here is imported by the tritonbn package.
"""
