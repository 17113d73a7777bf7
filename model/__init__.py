"""The Anomaly Transformer: network, minimax training, scoring, metrics and thresholds (torch + numpy only)."""
