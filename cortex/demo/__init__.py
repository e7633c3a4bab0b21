"""`cortex-tiny`: a small chat model the project makes offline (no hub access exists here)."""
