"""Runs the realtime service under uvicorn (the realtime issue adds the 1012 drain)."""

from __future__ import annotations


def serve(host: str = "0.0.0.0", port: int = 8001) -> None:  # noqa: S104
    import uvicorn

    uvicorn.run(
        "parley.config.asgi:application", host=host, port=port, ws_max_size=65536,
        ws_per_message_deflate=False, lifespan="off", log_level="info",
    )
