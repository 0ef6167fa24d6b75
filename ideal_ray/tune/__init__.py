"""Ray Tune sweeps: CFG scales on a trained GPT (``cfg_sweep``), the paper's ablations (``ablation``), and what
they share (``common``: MLflow parent/child runs, resumable Tuners)."""
