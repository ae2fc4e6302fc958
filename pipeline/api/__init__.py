"""`linewatch api`: the JSON API, the live event stream and the dashboard.

``store`` keeps events and latest camera frames in Redis, ``ingest`` fills it from Kafka, ``app``
serves it over HTTP.
"""
