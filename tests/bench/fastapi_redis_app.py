"""The usual prediction-cache design, for the server benchmark: FastAPI under uvicorn, answers cached
in Redis. A hit is one GET on Redis; a miss asks the hybridserve app in-process (a live computation)
and stores its answer with a TTL.

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_redis_app:app --workers 2
"""
import os

import redis.asyncio as redis
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

app = FastAPI()
cache = redis.Redis.from_url(os.environ["REDIS_URL"])
_live = None


def _compute(path: str) -> bytes:
    global _live
    if _live is None:  # built on the first miss: hits never need the model
        from serving.web.app import create_app
        _live = create_app(background=False).test_client()
    return _live.get(path).get_data()


@app.get("/v1/items/{item_id}/similar")
async def similar(item_id: int, request: Request, k: int = 10) -> Response:
    key = f"similar:{item_id}:{k}"
    body = await cache.get(key)
    if body is None:
        body = await run_in_threadpool(_compute, f"{request.url.path}?{request.url.query}")
        await cache.set(key, body, ex=300)
    return Response(body, media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    await cache.ping()
    return Response(b'{"status":"ok"}', media_type="application/json")
