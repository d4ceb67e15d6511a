"""Pure planning: checkpoint metadata, cluster description, device maps and load plans.

Nothing in this package talks to other processes or starts threads; it only reads metadata
(safetensors headers, index JSON, configs) and computes frozen plans.
"""
