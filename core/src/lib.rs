//! Wire tensors, job specs, the Redis transport and the worker runtime. Knows nothing of candle.
