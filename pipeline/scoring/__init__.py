"""Scoring stage: validated frames in, score messages out (engine-agnostic of Kafka)."""
