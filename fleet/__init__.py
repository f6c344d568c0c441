"""Host side: watch a fleet of agents through an MQTT broker."""
