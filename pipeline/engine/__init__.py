"""Training-free anomaly engine (WinCLIP, WinCLIP+, ALFA); knows nothing of Kafka or Redis."""
