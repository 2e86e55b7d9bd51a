"""dreambot bot: chat adapters and the platform-free core."""
