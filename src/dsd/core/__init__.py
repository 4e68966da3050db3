"""The DSD core, independent of any pipeline: per-tensor magnitude masks (`masks`, needs torch), phase
recipes (`schedule`, plain Python) and the driver that follows a recipe in any training loop (`driver`,
`dsd.DSD`, needs torch)."""
