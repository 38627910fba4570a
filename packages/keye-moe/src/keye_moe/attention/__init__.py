"""Built-in dense attention backends."""
