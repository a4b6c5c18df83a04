"""Descriptor caches: in-process memory now; Redis joins as a second layer later."""
