"""Test doubles a user of the library wants too (as trio ships ``trio.testing``)."""

from holepunch_mig.testing.channels import MemoryChannel, memory_channel_pair

__all__ = ["MemoryChannel", "memory_channel_pair"]
