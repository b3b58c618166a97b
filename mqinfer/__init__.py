"""mqinfer: discover, provision and orchestrate ML inference on edge nodes over MQTT."""
