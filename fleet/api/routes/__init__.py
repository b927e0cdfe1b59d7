"""One router per resource: reports, hard examples, health."""
