"""MemLong on Ray Serve: gateway, decoder replicas and ret-mem shards as Serve deployments."""
