"""`omniseg serve`: the web page and HTTP API (needs the `serve` extra: fastapi, uvicorn, python-multipart).
`create_app(predictor)` builds the FastAPI app; see app.py."""
