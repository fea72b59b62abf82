"""``SessionDep``: one database session per request, from the app's session maker;
``ReadSessionDep``: one for an endpoint that only reads, with one statement.

Use them as endpoint parameters (``session: SessionDep``); ``create_app`` puts
the session makers on ``app.state``. A read session's statements each commit on
their own (``db.make_read_engine``): a GET costs one round trip, not three
(BEGIN, SELECT, ROLLBACK), and its statements share no snapshot, so an endpoint
that reads several things that must agree (a team and its members) uses
``SessionDep``. What goes wrong without it: a session
shared between requests mixes their transactions, and one that is not closed
keeps its pooled connection until the pool runs dry (then every request is a
503). It lives apart from ``app.py`` because the routers need it and ``app.py``
needs the routers.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from ..db import is_connection_lost

logger = logging.getLogger("asyncpatterns.api")  # the API's one logger (see errors.py)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, from the app's session maker; closed afterwards.

    FastAPI closes it after the response is sent. Closing rolls back what was
    not committed; if the connection died meanwhile there is nothing left to
    roll back, and the answer is already out. So a failure here is logged, not
    raised: raising would make the server drop the client's keep-alive
    connection, and the client's next request with it.
    """
    async with _session(request, request.app.state.session_maker) as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """``get_session`` on the app's read engine: for endpoints of one SELECT."""
    async with _session(request, request.app.state.read_session_maker) as session:
        yield session


@asynccontextmanager
async def _session(
    request: Request, session_maker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncSession]:
    session = session_maker()
    try:
        yield session
    finally:
        try:
            await session.close()
        except Exception as exc:
            lost = is_connection_lost(exc)
            logger.log(
                logging.WARNING if lost else logging.ERROR,
                "%s %s: closing the session failed: %s",
                request.method,
                request.url.path,
                exc,
                exc_info=None if lost else exc,
            )


SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
