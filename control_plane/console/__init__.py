"""The fleet console at `/ui`: static files (no build step) and the JSON API they read."""
