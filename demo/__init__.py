"""Guidance Lab demo world: a deterministic procedural image/caption data set (see `demo.world`)."""
