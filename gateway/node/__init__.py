"""Services that join the pure core to the storage and key shells."""
