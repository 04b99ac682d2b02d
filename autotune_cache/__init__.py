"""Pre-tuned launch settings shipped with tritonbn (JSON files, package data).

See tritonbn/autotune. Installed as ``tritonbn.autotune_cache``.
"""
