"""Built-in adapter types (one pluggy plugin module per type) and the structural auto-detector."""
