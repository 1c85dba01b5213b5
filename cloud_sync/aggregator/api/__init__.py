"""HTTP API routers (FastAPI): device endpoints, reports, admin, health and metrics."""
