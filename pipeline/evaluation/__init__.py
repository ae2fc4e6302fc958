"""Offline evaluation on MVTec-AD-style datasets: metrics, dataset walking, the eval runner."""
