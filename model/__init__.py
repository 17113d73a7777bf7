"""The Anomaly Transformer: network, minimax training, scoring, metrics, thresholds.

torch and numpy only.
"""
