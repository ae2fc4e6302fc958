"""Alerting: per-frame scores -> debounced, persisted defect events.

`debounce` is the pure per-camera state machine, `render` turns a peak frame into masks, regions and
thumbnails, `state_store` keeps camera states in Redis, and `stage` ties them together for the worker.
"""
