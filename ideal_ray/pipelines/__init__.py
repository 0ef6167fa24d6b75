"""Offline jobs over whole datasets, each a function a job calls, on a Ray actor pool or in one process:
token extraction (``extract_local`` / ``extract_ray``, sharing ``extract_common``), sampling (``sample_local`` /
``sample_ray``) and evaluation (``evaluate``). The chain of every stage is one layer up, ``ideal_ray.pipeline``.
"""
