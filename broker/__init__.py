"""Embedded MQTT broker for demos and single hosts (production deployments use Mosquitto)."""
