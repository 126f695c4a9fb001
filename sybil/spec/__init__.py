"""Speculation: drafters that propose tokens (a Drafter base class; model, n-gram,
suffix and cascade drafters) and the controllers that choose each round's windows
(FixedK, AdaptiveK, BatchK behind one Controller interface). What is kept is decided
by sybil.sample.accept, never here."""
