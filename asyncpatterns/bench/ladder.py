"""The served-app bench's ladder: the same four endpoints, written five ways.

    GET /users/{id}    GET /users/?skip=&limit=50    POST /users/    PATCH /users/{id}

* ``raw`` -- Starlette on the async driver itself (asyncpg, aiomysql,
  aiosqlite), one SQL statement per request: the practical limit.
* ``fastapi-core`` -- FastAPI with SQLAlchemy Core on the kit's engine, no ORM.
* ``seed`` -- the common tutorial app: a plain ``create_async_engine``,
  ``Depends(get_session)``, ``session.exec(select(...))``, the table model as
  the answer.
* ``kit`` -- the kit's app (``asyncpatterns.api``), as ``serve`` runs it.
* ``sync`` -- the seed's endpoints as ``def`` functions on synchronous
  sessions (psycopg, pymysql, sqlite3), in FastAPI's thread pool.

Each is a factory for ``uvicorn --factory``, reading its database URL from
``$ASYNCPATTERNS_BENCH_URL``. The raw and core rungs check what they are sent
only as much as their SQL needs; they are yardsticks, not patterns to copy.
"""

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import create_engine, insert, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import Session, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..db import make_engine
from ..models import User, UserCreate

URL_VARIABLE = "ASYNCPATTERNS_BENCH_URL"
COLUMNS = "id, name, email, is_active, team_id, version"
POOL_SIZE = 15  # the raw rung's pool: as many connections as the kit's pool at most (5 + 10)


def _url() -> URL:
    return make_url(os.environ[URL_VARIABLE])


class UserPatch(SQLModel):
    """The seed's and the sync rung's PATCH body: the fields to change."""

    name: str | None = None
    email: str | None = None
    is_active: bool | None = None


# -- raw: Starlette and the driver -------------------------------------------------------


class _Driver:
    """One statement per call on the backend's own async driver, rows as dicts."""

    async def open(self, url: URL) -> None:
        self.backend = url.get_backend_name()
        if self.backend == "postgresql":
            import asyncpg

            self.pool = await asyncpg.create_pool(
                url.set(drivername="postgresql").render_as_string(hide_password=False),
                min_size=POOL_SIZE,
                max_size=POOL_SIZE,
            )
        elif self.backend == "mysql":
            import aiomysql

            self.pool = await aiomysql.create_pool(
                host=url.host,
                port=url.port or 3306,
                user=url.username,
                password=url.password or "",
                db=url.database,
                autocommit=True,
                charset="utf8mb4",
                minsize=POOL_SIZE,
                maxsize=POOL_SIZE,
            )
        else:  # one connection: SQLite has one writer, and each connection is a thread
            import aiosqlite

            self.sqlite = await aiosqlite.connect(url.database, isolation_level=None)
            self.sqlite.row_factory = aiosqlite.Row
            await self.sqlite.execute("PRAGMA journal_mode=WAL")
            await self.sqlite.execute("PRAGMA busy_timeout=5000")

    async def close(self) -> None:
        if self.backend == "postgresql":
            await self.pool.close()
        elif self.backend == "mysql":
            self.pool.close()
            await self.pool.wait_closed()
        else:
            await self.sqlite.close()

    def sql(self, statement: str) -> str:
        """``statement`` with ``?`` placeholders and ``"user"``, in this backend's spelling."""
        if self.backend == "postgresql":
            parts = statement.split("?")
            statement = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        elif self.backend == "mysql":
            statement = statement.replace("?", "%s").replace('"user"', "`user`")
        return statement

    async def all(self, statement: str, *args: Any) -> list[dict[str, Any]]:
        statement = self.sql(statement)
        if self.backend == "postgresql":
            return [dict(row) for row in await self.pool.fetch(statement, *args)]
        if self.backend == "mysql":
            import aiomysql

            async with self.pool.acquire() as conn, conn.cursor(aiomysql.DictCursor) as cursor:
                await cursor.execute(statement, args)
                return list(await cursor.fetchall())
        async with self.sqlite.execute(statement, args) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def one(self, statement: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.all(statement, *args)
        return _user(rows[0]) if rows else None


def _user(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "is_active": bool(row["is_active"])}


def raw() -> Starlette:
    driver = _Driver()

    async def get_user(request: Request) -> JSONResponse:
        row = await driver.one(
            f'SELECT {COLUMNS} FROM "user" WHERE id = ?', int(request.path_params["id"])
        )
        return JSONResponse(row) if row else JSONResponse({"detail": "Not found"}, 404)

    async def list_users(request: Request) -> JSONResponse:
        skip = int(request.query_params.get("skip", 0))
        limit = min(int(request.query_params.get("limit", 100)), 100)
        rows = await driver.all(
            f'SELECT {COLUMNS} FROM "user" ORDER BY id LIMIT ? OFFSET ?', limit, skip
        )
        return JSONResponse([_user(row) for row in rows])

    async def create_user(request: Request) -> JSONResponse:
        body = await request.json()
        row = await driver.one(
            f'INSERT INTO "user" (name, email, is_active, version) VALUES (?, ?, ?, 1) '
            f"RETURNING {COLUMNS}",
            body["name"],
            body["email"].lower(),
            True,
        )
        return JSONResponse(row, 201)

    async def update_user(request: Request) -> JSONResponse:
        user_id, name = int(request.path_params["id"]), (await request.json())["name"]
        if driver.backend == "mysql":  # MariaDB has no UPDATE ... RETURNING: two statements
            await driver.all(
                'UPDATE "user" SET name = ?, version = version + 1 WHERE id = ?', name, user_id
            )
            row = await driver.one(f'SELECT {COLUMNS} FROM "user" WHERE id = ?', user_id)
        else:
            row = await driver.one(
                f'UPDATE "user" SET name = ?, version = version + 1 WHERE id = ? '
                f"RETURNING {COLUMNS}",
                name,
                user_id,
            )
        return JSONResponse(row) if row else JSONResponse({"detail": "Not found"}, 404)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await driver.open(_url())
        try:
            yield
        finally:
            await driver.close()

    return Starlette(
        routes=[
            Route("/users/{id:int}", get_user, methods=["GET"]),
            Route("/users/{id:int}", update_user, methods=["PATCH"]),
            Route("/users/", list_users, methods=["GET"]),
            Route("/users/", create_user, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


# -- fastapi-core: FastAPI and SQLAlchemy Core on the kit's engine -----------------------


def fastapi_core() -> FastAPI:
    engine = make_engine(_url())
    users = User.__table__
    app = FastAPI(lifespan=_disposing(engine))

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if row is None:
            raise HTTPException(404, "Not found")
        return row._asdict()

    @app.get("/users/")
    async def list_users(skip: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        page = select(users).order_by(users.c.id).offset(skip).limit(min(limit, 100))
        async with engine.connect() as conn:
            return [row._asdict() for row in await conn.execute(page)]

    @app.post("/users/", status_code=201)
    async def create_user(user: UserCreate) -> dict[str, Any]:
        values = {"name": user.name, "email": user.email, "is_active": True, "version": 1}
        async with engine.begin() as conn:
            row = (await conn.execute(insert(users).values(values).returning(users))).one()
        return row._asdict()

    @app.patch("/users/{user_id}")
    async def update_user(user_id: int, changes: UserPatch) -> dict[str, Any]:
        values = {**changes.model_dump(exclude_unset=True), "version": users.c.version + 1}
        change = update(users).where(users.c.id == user_id).values(values)
        async with engine.begin() as conn:
            if engine.dialect.update_returning:
                row = (await conn.execute(change.returning(users))).first()
            else:
                await conn.execute(change)
                row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if row is None:
            raise HTTPException(404, "Not found")
        return row._asdict()

    return app


def _disposing(engine: Any) -> Any:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    return lifespan


# -- seed: the common tutorial app ------------------------------------------------------


def seed() -> FastAPI:
    engine = create_async_engine(_url())
    app = FastAPI(lifespan=_disposing(engine))

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            yield session

    AsyncSessionDep = Annotated[AsyncSession, Depends(get_session)]

    @app.get("/users/{user_id}", response_model=User)
    async def read_user(user_id: int, session: AsyncSessionDep) -> User:
        user = await session.get(User, user_id)
        if not user:
            raise HTTPException(404, "User not found")
        return user

    @app.get("/users/", response_model=list[User])
    async def read_users(session: AsyncSessionDep, skip: int = 0, limit: int = 100) -> list[User]:
        return list((await session.exec(select(User).offset(skip).limit(limit))).all())

    @app.post("/users/", response_model=User, status_code=201)
    async def create_user(user: UserCreate, session: AsyncSessionDep) -> User:
        db_user = User.model_validate(user)
        session.add(db_user)
        await session.commit()
        await session.refresh(db_user)
        return db_user

    @app.patch("/users/{user_id}", response_model=User)
    async def update_user(user_id: int, user: UserPatch, session: AsyncSessionDep) -> User:
        db_user = await session.get(User, user_id)
        if not db_user:
            raise HTTPException(404, "User not found")
        db_user.sqlmodel_update(user.model_dump(exclude_unset=True))
        session.add(db_user)
        await session.commit()
        await session.refresh(db_user)
        return db_user

    return app


# -- kit: the kit's app ------------------------------------------------------------------


def kit() -> FastAPI:
    from ..api import create_app

    return create_app(_url())


# -- sync: the seed's endpoints on synchronous sessions, in the thread pool -----------------

SYNC_DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "sqlite": "sqlite"}
SYNC_THREADS = 40  # AnyIO's default thread limiter: the most def endpoints that run at once


def sync() -> FastAPI:
    url = _url()
    # One connection per worker thread (AnyIO's default limit is 40 threads). With
    # SQLAlchemy's default pool (5 + 10) and 128 clients, all 40 threads wait for a
    # connection, while each request that holds one needs a thread too: FastAPI
    # validates a def endpoint's answer in the thread pool, and the session keeps its
    # connection until then. The app stalls for pool_timeout (30 s); measured, no
    # answer at all in the bench's cells after the first at 128 connections.
    engine = create_engine(
        url.set(drivername=SYNC_DRIVERS[url.get_backend_name()]),
        pool_size=SYNC_THREADS,
        max_overflow=0,
    )
    app = FastAPI()

    def get_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    SessionDep = Annotated[Session, Depends(get_session)]

    @app.get("/users/{user_id}", response_model=User)
    def read_user(user_id: int, session: SessionDep) -> User:
        user = session.get(User, user_id)
        if not user:
            raise HTTPException(404, "User not found")
        return user

    @app.get("/users/", response_model=list[User])
    def read_users(session: SessionDep, skip: int = 0, limit: int = 100) -> list[User]:
        return list(session.exec(select(User).offset(skip).limit(limit)).all())

    @app.post("/users/", response_model=User, status_code=201)
    def create_user(user: UserCreate, session: SessionDep) -> User:
        db_user = User.model_validate(user)
        session.add(db_user)
        session.commit()
        session.refresh(db_user)
        return db_user

    @app.patch("/users/{user_id}", response_model=User)
    def update_user(user_id: int, user: UserPatch, session: SessionDep) -> User:
        db_user = session.get(User, user_id)
        if not db_user:
            raise HTTPException(404, "User not found")
        db_user.sqlmodel_update(user.model_dump(exclude_unset=True))
        session.add(db_user)
        session.commit()
        session.refresh(db_user)
        return db_user

    return app


RUNGS = {"raw": raw, "fastapi-core": fastapi_core, "seed": seed, "kit": kit, "sync": sync}
