"""The reference design SPEC.md's Zipf read target is measured against.

The classic Python read path, written the way its authors would write it:
FastAPI on uvicorn (uvloop, httptools), an asyncpg pool opened at start-up and
Redis cache-aside through redis.asyncio. GET /users/{id} looks the key up in
Redis; a hit is returned as stored, a miss selects the row, stores its JSON
with a TTL and returns it. The JSON has the same shape as userapi's.

Configuration comes from the environment:
  DATABASE_URL  postgres://user@host:port/db (required)
  REDIS_URL     redis://host:port/db (required)
  CACHE_TTL     seconds a cached user lives (default 300, as userapi's --cache-ttl)
  POOL_SIZE     asyncpg connections per worker (default 10, asyncpg's own default)

Run with scripts/perf-fastapi, or by hand:
  python3 -m uvicorn app:app --workers 2 --loop uvloop --http httptools \
      --no-access-log --host 127.0.0.1 --port 8000
"""

import json
import os
from datetime import timezone

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Response

DATABASE_URL = os.environ["DATABASE_URL"]
REDIS_URL = os.environ["REDIS_URL"]
CACHE_TTL = int(os.environ.get("CACHE_TTL", "300"))
POOL_SIZE = int(os.environ.get("POOL_SIZE", "10"))

SELECT_USER = """
SELECT id, email, name, created_at, updated_at, version
FROM users
WHERE id = $1
"""

app = FastAPI()


def _ts(t):
    # userapi's layout: RFC 3339 in UTC with exactly six fractional digits.
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cache_key(user_id: int) -> str:
    return f"user:{user_id}"


@app.on_event("startup")
async def startup() -> None:
    # Each worker process opens its own pool and Redis client.
    app.state.db = await asyncpg.create_pool(
        DATABASE_URL, min_size=POOL_SIZE, max_size=POOL_SIZE
    )
    app.state.redis = aioredis.from_url(REDIS_URL)


@app.on_event("shutdown")
async def shutdown() -> None:
    await app.state.redis.close()
    await app.state.db.close()


@app.get("/readyz")
async def readyz() -> Response:
    async with app.state.db.acquire() as conn:
        await conn.fetchval("SELECT 1")
    await app.state.redis.ping()
    return Response(content="ok\n", media_type="text/plain")


@app.get("/users/{user_id}")
async def get_user(user_id: int) -> Response:
    key = _cache_key(user_id)
    cached = await app.state.redis.get(key)
    if cached is not None:
        return Response(content=cached, media_type="application/json")

    row = await app.state.db.fetchrow(SELECT_USER, user_id)
    if row is None:
        raise HTTPException(status_code=404, detail="user not found")
    body = json.dumps(
        {
            "id": row["id"],
            "email": row["email"],
            "name": row["name"],
            "created_at": _ts(row["created_at"]),
            "updated_at": _ts(row["updated_at"]),
            "version": row["version"],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    await app.state.redis.set(key, body, ex=CACHE_TTL)
    return Response(content=body, media_type="application/json")
