"""Host side: load, export, quantize, evaluate and bundle a model for one device."""
