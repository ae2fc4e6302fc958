"""Long-running workers: capture, scoring, alerting."""
