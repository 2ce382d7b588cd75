"""Pure pacing policy: token buckets, back-off, the card scheduler, update coalescing, circuit breaker, fair queue."""
