"""The status page's routes, one router per kind: ``ops`` (open: /health, /metrics),
``session`` (login, logout), ``status`` (login required: the page, its API and streams)."""
