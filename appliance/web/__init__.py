"""The appliance's local status page, /health and /metrics (FastAPI + uvicorn in a thread)."""
