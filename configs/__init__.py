"""ml-collections configs: `base.py` holds every default and `validate`; the other modules are presets."""
