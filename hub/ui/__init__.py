"""The hub's web dashboard at /ui (README.md here): pages served from `static/`, their data and the live stream at
/events (routes.py), browser sessions (session.py), the stream's changes and telemetry history (feed.py)."""
