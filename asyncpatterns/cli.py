"""``python -m asyncpatterns tour | bench | serve``.

``tour`` runs every pattern once against the embedded SQLite file (or
``--url`` / ``$DATABASE_URL``) and prints a short report. It creates the kit's
tables, refuses to touch a database whose tables already hold data, and drops
the tables when it is done.
"""

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpatterns import crud
from asyncpatterns.config import ConfigurationError, DatabaseUnavailableError, mask_password
from asyncpatterns.db import (
    create_db_and_tables,
    drop_db_and_tables,
    make_engine,
    make_session_maker,
)
from asyncpatterns.models import User
from asyncpatterns.sqlwatch import watch_sql

TourStep = Callable[[AsyncEngine], Awaitable[list[str]]]


async def _tour_crud(engine: AsyncEngine) -> list[str]:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        users = [User(name=f"User {i}", email=f"user{i}@example.com") for i in range(1000)]
        with watch_sql(engine) as sql:
            created = await crud.create_users(session, users)
        ada = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
        try:
            await crud.create_user(session, User(name="Eve", email="ada@example.com"))
            duplicate = "stored a duplicate (bug)"
        except crud.DuplicateEmailError:
            duplicate = "refused (DuplicateEmailError)"
        await crud.update_user(session, ada.id, {"name": "Ada Lovelace"})
        deactivated = await crud.deactivate_users(session, [u.id for u in created[:10]])
        deleted = await crud.delete_inactive_users(session)
        remaining = await crud.count_users(session)
    return [
        f"create_users: {len(created)} users, ids {created[0].id}..{created[-1].id}, "
        f"in {sql.count} statement(s)",
        f"duplicate email: {duplicate}",
        f"update, deactivate {deactivated}, delete inactive {deleted}: {remaining} users remain",
    ]


TOUR_STEPS: list[tuple[str, TourStep]] = [
    ("CRUD", _tour_crud),
]


async def tour(url: str | None = None) -> int:
    engine = make_engine(url)
    print(f"asyncpatterns tour on {mask_password(engine.url)}")
    try:
        await create_db_and_tables(engine)
        async with make_session_maker(engine)() as session:
            if await crud.count_users(session):
                print(
                    "This database already has users; the tour only runs on a "
                    "scratch database. Pass --url to an empty one.",
                    file=sys.stderr,
                )
                return 1
        try:
            for title, step in TOUR_STEPS:
                print(f"\n== {title}")
                for line in await step(engine):
                    print(f"   {line}")
        finally:
            await drop_db_and_tables(engine)
    finally:
        await engine.dispose()
    print("\nTour complete.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncpatterns")
    commands = parser.add_subparsers(dest="command", required=True)
    tour_parser = commands.add_parser("tour", help="run every pattern once and report")
    tour_parser.add_argument("--url", help="database URL (default: $DATABASE_URL or SQLite)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tour":
            return asyncio.run(tour(args.url))
    except (ConfigurationError, DatabaseUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
