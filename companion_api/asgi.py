"""ASGI entry point for uvicorn workers: `uvicorn companion_api.asgi:app`."""
from .main import create_app

app = create_app(migrate=False)  # `retinaedge serve` migrates once before the workers start
