"""Delivery of defect events to subscribers: filters, rate limits, channels, ledger, dispatch."""
