"""The collector's HTTP API (FastAPI): one router per resource under ``routes/``, shared deps in ``deps``."""
