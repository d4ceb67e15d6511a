"""Runnable examples (each is tested): torchrun data / tensor parallel, Ray actors, ray job submit."""
