"""Evaluation with one pinned protocol (spec section 8).

``inception`` (the FID Inception network, offline), ``fid`` (features and FID/sFID/IS/precision-recall),
``reference`` (cached reference statistics), ``recon`` (PSNR/SSIM/codebook usage), ``semantics`` (zero-shot and
linear probe). Every number comes with a ``protocol`` dict that says how it was made.
"""
