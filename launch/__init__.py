"""How processes start: local spawning, torchrun, Ray, cluster start-up, and the CLI.

Launchers only produce the torchrun environment (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, node identity); workers never know who started them.
"""
