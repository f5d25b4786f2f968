"""The scoring worker: a Kafka consumer-group member that windows, scores and emits events.

`loop` is the state machine; `app` builds it from the settings and owns what lives as long as it
(the Kafka clients, the model follower, the HTTP server); `cli` is `aewatch worker`.
"""
