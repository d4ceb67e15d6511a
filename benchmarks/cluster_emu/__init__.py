"""An emulated multi-node cluster on one machine, and the benchmark that runs on it.

Nodes are network namespaces joined by a bridge over rate-limited veth pairs
(:mod:`~benchmarks.cluster_emu.netns`); shared storage is a FUSE mount with an aggregate
bandwidth cap and per-node byte counters (:mod:`~benchmarks.cluster_emu.storagefs`,
:mod:`~benchmarks.cluster_emu.storage`); each node's ranks run under torchrun inside its
namespace (:mod:`~benchmarks.cluster_emu.harness`); :mod:`~benchmarks.cluster_emu.run` is the
command line (``python -m benchmarks.cluster_emu.run``, ``weightcast emulate``). Needs root.
"""
