"""Offline pipelines over whole datasets (token extraction).

``extract_local.extract_tokens_local`` encodes a split in one process (no Ray): the reference implementation,
the demo path and the fallback. Both it and the Ray actor-pool version (issue 5) write the token shard format of
``ideal_ray.data.tokens``.
"""
