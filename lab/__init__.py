"""Research tooling outside the Flower apps: ``fedsb compare`` and its report, the run comparer, and the
tiny models and deployment harnesses that bench/ and tests/ share (no node ever runs any of it)."""
