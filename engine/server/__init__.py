"""`toyllm serve`: an OpenAI-compatible HTTP server on the serving engine (docs/SERVER.md).

protocol.py (the requests' JSON and the responses' shapes), errors.py (OpenAI-style error
bodies), engine_face.py (what the HTTP side sees of the engine: admission, request streams,
events), engine_process.py + engine_core.py + pipe_messages.py (the engine in a process of its
own, the default), engine_loop.py (the engine in a thread: `--engine thread`), step_loop.py
(the engine's iteration loop, run by both), engine_spec.py (the engine's options and what builds
it), metrics.py (Prometheus text), app.py (the FastAPI routes), sse.py (a stream's events as
text), launch.py (socket, model, uvicorn, SIGTERM).
"""
