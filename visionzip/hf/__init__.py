"""VisionZip in transformers' model classes: thin subclasses, one file per family, on the core below."""
