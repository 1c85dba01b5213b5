"""Business logic shared by the HTTP API, the MQTT bridge and the CLI."""
