"""Cameras at run time: the Redis registry, the leases that share them between capture workers, health."""
