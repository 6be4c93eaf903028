"""Self-supervised pretraining whose encoders become backbones (SimCLR)."""
