"""The operations loop: operator feedback on alarms (`feedback`), its join to the alarms the
worker emitted (`tracker`), the companion process that serves the live figures (`service`,
`metrics`) and the commands `aewatch feedback` and `aewatch quality` (`cli`)."""
