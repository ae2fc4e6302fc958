"""Normal reference sets built from the line: versioned in Redis, coreset-bounded, picked up live."""
