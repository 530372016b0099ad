"""`toyllm serve`: an OpenAI-compatible HTTP server on the serving engine (docs/SERVER.md).

protocol.py (the requests' JSON and the responses' shapes), errors.py (OpenAI-style error
bodies), engine_loop.py (the one thread that owns the model and steps the engine), metrics.py
(Prometheus text), app.py (the FastAPI routes), sse.py (a stream's events as text), launch.py
(socket, model, uvicorn, SIGTERM).
"""
