"""The platform-free core: commands, rules, the store, job submission and delivery."""
