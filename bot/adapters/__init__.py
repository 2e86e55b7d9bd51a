"""Chat adapters: they translate between a chat platform and the core, and hold no rules."""
