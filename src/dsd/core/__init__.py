"""The DSD core, independent of any pipeline: per-tensor magnitude masks (`masks`, needs torch) and phase
recipes (`schedule`, plain Python)."""
